"""Search stage: resolve ``--catalog`` and find the Sentinel-2 L2A scenes over a bbox and a period.

``--catalog`` is one of: ``sample`` (the embedded offline sample, generated once into the cache), a provider
profile name (``ndvi-scale catalogs``), a STAC API URL (searched with pystac-client), or a local
item-collection file (item, FeatureCollection, API page or JSON array; filtered here, client-side).

A STAC API is searched with what its profile says (:mod:`ndvi_scale.profiles`): collections, asset keys, page
size, whether ``eo:cloud_cover`` can be filtered server-side. A bare URL is matched to a profile with
:func:`~ndvi_scale.profiles.profile_for_url`; an unknown URL gets no server-side cloud filter at all, because
some servers silently answer 0 items to a ``query``/``filter`` they do not implement (rustac's memory backend
does). Cloud cover, bbox and dates are always checked again client-side, whatever the server did.

Paging follows the API's ``next`` links (POST links with a JSON body token, or GET links with ``?token=``),
every request with the retry policy of :mod:`ndvi_scale.http`. Items stay unsigned here: hrefs that need a
signature (Planetary Computer) are signed at build time, right before reading
(:func:`ndvi_scale.pipeline.plan_sources` with :func:`ndvi_scale.load.sign_items`).
"""

from __future__ import annotations

import collections
import datetime as dt
import math
import os
import re
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .config import BBox, RunConfig
from .errors import CatalogError, NoScenesError, shown
from .faults import clean_href, scrub
from .items import S2Item, Skipped, normalize_item, read_items

if TYPE_CHECKING:
    from .profiles import Profile

_SAMPLE_NAMES = ("sample",)

#: ``limit`` (items per page) for an API without a profile. pystac-client's default of 10 turns a year of
#: scenes into dozens of round trips (pystac-client #49, #115); 100 is accepted by every STAC API we know.
DEFAULT_PAGE_LIMIT = 100

#: At most this many dates are listed one by one in :meth:`SearchResult.summary`; beyond, the span is given.
_SUMMARY_DATES = 6


def _reason_kind(reason: str) -> str:
    """The stable part of a skip reason (without the item's values), to count reasons in a summary."""
    return re.split(r" \(|; |: ", reason, maxsplit=1)[0].strip()


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
    """Provider profile name when the catalog was a profile (or a URL matching one)."""
    notes: tuple[str, ...] = field(default_factory=tuple)
    """How the search was done (requests, pages, server-side filters) and warnings gathered on the way."""

    def skipped_reasons(self) -> collections.Counter[str]:
        """How many items were skipped for each kind of reason (most common first with ``most_common()``)."""
        return collections.Counter(_reason_kind(s.reason) for s in self.skipped)

    def summary(self) -> str:
        """One line: scenes, dates, tiles, CRSs, skipped items with their reasons."""
        days = sorted({it.datetime.astimezone(dt.UTC).date() for it in self.items})
        tiles = sorted({it.tile for it in self.items if it.tile})
        crs_counts = collections.Counter(f"EPSG:{it.epsg}" for it in self.items if it.epsg)
        if not days:
            span = "-"
        elif len(days) <= _SUMMARY_DATES:
            span = ", ".join(str(d) for d in days)
        else:
            span = f"{days[0]} .. {days[-1]}"
        if len(crs_counts) > 1:
            crs = ", ".join(f"{c} x{n}" for c, n in sorted(crs_counts.items()))
        else:
            crs = ", ".join(crs_counts) or "from files"
        no_crs = sum(1 for it in self.items if not it.epsg)
        if crs_counts and no_crs:
            crs += f" (+{no_crs} from files)"
        text = (
            f"{len(self.items)} scenes on {len(days)} dates ({span}), tiles {', '.join(tiles) or '-'}, "
            f"CRS {crs}; {len(self.skipped)} skipped"
        )
        if self.skipped:
            text += " (" + ", ".join(f"{r} x{n}" for r, n in self.skipped_reasons().most_common()) + ")"
        warned = sum(1 for it in self.items if it.warnings)
        if warned:
            text += f"; {warned} with metadata warnings (see ndvi-scale inspect)"
        return text


# ---------------------------------------------------------------------------------------- hostile input

#: Widest footprint (degrees of longitude or latitude) accepted for one item. A Sentinel-2 granule is 110 km
#: square: under 10 degrees of longitude up to 84 N. Wider is a whole-world or antimeridian footprint.
MAX_FOOTPRINT_DEG = 20.0
#: Coordinates of an item's geometry looked at (a granule's footprint has a few dozen).
_MAX_GEOMETRY_NUMBERS = 200_000
#: Schemes an asset href may use (any catalog). Everything else (file://, /vsi..., ftp://, ...) is refused,
#: local paths follow :class:`HrefPolicy`.
REMOTE_SCHEMES = ("http", "https", "s3", "gs")
_HREF_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


def _finite_numbers(values: Any) -> list[float] | None:
    if not isinstance(values, list | tuple):
        return None
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            return None
        out.append(float(v))
    return out


def _extent_problem(w: float, s: float, e: float, n: float, what: str) -> str | None:
    if not (-180 <= w <= 180 and -180 <= e <= 180 and -90 <= s <= 90 and -90 <= n <= 90):
        return f"invalid footprint ({what} out of range: {w:g} {s:g} {e:g} {n:g})"
    if w > e:
        return f"invalid footprint ({what} crosses the antimeridian: west {w:g} > east {e:g})"
    if e - w > MAX_FOOTPRINT_DEG or n - s > MAX_FOOTPRINT_DEG:
        return (f"invalid footprint ({what} spans {e - w:g} x {n - s:g} degrees, not one granule: a whole-world "
                "or antimeridian item)")
    return None


def footprint_problem(item: Mapping[str, Any]) -> str | None:
    """Why the bbox or geometry of a raw STAC item cannot be used (NaN/inf or non-numbers, out of range, across
    the antimeridian, wider than :data:`MAX_FOOTPRINT_DEG`), or None. Absent ones are fine (the files say)."""
    bbox = item.get("bbox")
    if bbox is not None:
        nums = _finite_numbers(bbox)
        if nums is None or len(nums) not in (4, 6):
            return f"invalid footprint (bbox {shown(bbox, 60)} is not 4 or 6 finite numbers)"
        if len(nums) == 6:
            nums = [nums[0], nums[1], nums[3], nums[4]]
        problem = _extent_problem(nums[0], nums[1], nums[2], nums[3], "bbox")
        if problem:
            return problem
    geometry = item.get("geometry")
    if geometry is None:
        return None
    if not isinstance(geometry, Mapping) or "coordinates" not in geometry:
        return f"invalid footprint (geometry {shown(geometry, 60)} has no coordinates)"
    lons: list[float] = []
    lats: list[float] = []
    todo = [geometry["coordinates"]]
    seen = 0
    while todo:  # iterative, bounded: no recursion on deep or huge documents
        node = todo.pop()
        seen += 1
        if seen > _MAX_GEOMETRY_NUMBERS:
            return "invalid footprint (geometry has too many coordinates for a granule)"
        if isinstance(node, list | tuple) and node and not isinstance(node[0], list | tuple):
            pos = _finite_numbers(node)
            if pos is None or len(pos) < 2:
                return f"invalid footprint (geometry position {shown(node, 40)} is not finite numbers)"
            lons.append(pos[0])
            lats.append(pos[1])
        elif isinstance(node, list | tuple):
            todo.extend(node)
        else:
            return f"invalid footprint (geometry coordinate {shown(node, 40)} is not a position)"
    if not lons:
        return "invalid footprint (geometry has no position)"
    return _extent_problem(min(lons), min(lats), max(lons), max(lats), "geometry")


@dataclass(frozen=True)
class HrefPolicy:
    """Which asset hrefs a catalog may point at (checked per item before anything is opened).

    * http(s)://, s3:// and gs:// from any catalog;
    * GDAL virtual file systems (``/vsicurl/``, ``/vsizip/``, ...) and other schemes never;
    * local paths (and file:// URLs): from a local catalog only inside its folder tree (``..`` and symlinks
      resolved), from a remote catalog never; ``allow_local`` (``--allow-local``) lifts both restrictions.
    """

    remote: bool
    """The catalog was read over the network (STAC API, profile, http(s) item collection)."""
    root: str | None = None
    """Folder of a local catalog (resolved), inside which its local hrefs must stay."""
    allow_local: bool = False

    def problem(self, href: str) -> str | None:
        h = str(href).strip()
        shown_href = shown(clean_href(h), 60)
        if h.lower().startswith(("/vsi", "\\vsi")) or "/vsi" in h.lower()[:6]:
            return f"asset href not allowed ({shown_href}: GDAL virtual file systems are refused)"
        m = _HREF_SCHEME.match(h)
        scheme = m.group(1).lower() if m else ""
        if scheme in REMOTE_SCHEMES:
            return None
        if scheme and scheme != "file":
            return f"asset href not allowed ({shown_href}: expected http(s)://, s3:// or gs://)"
        if self.allow_local:
            return None
        if self.remote:
            return (f"asset href not allowed ({shown_href}: a local file in a remote catalog; pass --allow-local "
                    "to read it)")
        path = urllib.request.url2pathname(urllib.parse.urlsplit(h).path) if scheme == "file" else h
        real = os.path.realpath(path)
        root = self.root
        if root and (real == root or real.startswith(root.rstrip(os.sep) + os.sep)):
            return None
        return (f"asset href not allowed ({shown_href}: outside the catalog's folder; pass --allow-local to read "
                "it)")

    def item_problem(self, item: S2Item) -> str | None:
        for name, band in item.bands.items():
            problem = self.problem(band.href)
            if problem:
                return problem.replace("asset href not allowed (", f"asset href not allowed ({name} ", 1)
        return None


def _intersects(a: Sequence[float] | None, b: BBox) -> bool:
    if not a or len(a) < 4:
        return True  # items without bbox are kept: the loader finds out
    w, s, e, n = a[0], a[1], a[-2], a[-1]
    return w < b.east and e > b.west and s < b.north and n > b.south


def _in_dates(when: dt.datetime, start: dt.date, end: dt.date) -> bool:
    day = when.astimezone(dt.UTC).date()
    return start <= day <= end


def filter_items(
    raw: Iterable[Mapping[str, Any]],
    cfg: RunConfig,
    *,
    base_href: str | None = None,
    aliases: Mapping[str, Iterable[str]] | None = None,
    hrefs: HrefPolicy | None = None,
) -> tuple[list[S2Item], list[Skipped]]:
    """Normalise raw item dicts and keep those inside bbox/dates/cloud limit (client-side filtering).

    ``aliases`` is the asset-key table of the provider profile (default table when None). Items outside the
    bbox or dates are dropped silently (not asked for); unusable items (a NaN, out-of-range or whole-world
    footprint, an asset href ``hrefs`` refuses, ...) and items above ``max_cloud`` are returned as
    :class:`Skipped` with the reason. Items without ``eo:cloud_cover`` are kept.
    """
    keep: list[S2Item] = []
    skipped: list[Skipped] = []
    for obj in raw:
        it = normalize_item(obj, base_href=base_href, aliases=aliases)
        if isinstance(it, Skipped):
            skipped.append(it)
            continue
        bad = footprint_problem(obj) if isinstance(obj, Mapping) else None
        if bad is None and hrefs is not None:
            bad = hrefs.item_problem(it)
        if bad is not None:
            skipped.append(Skipped(it.id, bad))
            continue
        if not _in_dates(it.datetime, cfg.start, cfg.end) or not _intersects(it.bbox, cfg.bbox):
            continue  # outside the request: not "skipped", simply not matched
        if it.cloud_cover is not None and it.cloud_cover > cfg.max_cloud:
            why = f"cloud cover above max_cloud {cfg.max_cloud:g}% (eo:cloud_cover {it.cloud_cover:g})"
            skipped.append(Skipped(it.id, why))
            continue
        keep.append(it)
    keep.sort(key=lambda it: (it.datetime, it.id))
    return keep, skipped


def _is_url(s: str) -> bool:
    return s.startswith(("http://", "https://"))


def _is_file_like(cat: str) -> bool:
    """An item-collection document: a URL of a .json file, a file:// URL or a local path."""
    if _is_url(cat) or cat.startswith("file://") or cat.endswith(".json"):
        return True
    return os.sep in cat or os.path.exists(cat)


def _search_method(client: Any) -> str:
    """POST when the landing page advertises it (or says nothing), else GET (pystac-client always POSTs)."""
    methods = {
        str(link.extra_fields.get("method") or "GET").upper() for link in client.get_links("search")
    }
    return "POST" if not methods or "POST" in methods else "GET"


def _cloud_filter(client: Any, cfg: RunConfig, profile: Profile | None) -> tuple[dict[str, Any], str]:
    """Server-side ``eo:cloud_cover`` arguments for ``client.search`` and a note saying what was done."""
    from pystac_client.conformance import ConformanceClasses

    if cfg.max_cloud >= 100:
        return {}, "no cloud cover limit"
    if profile is None:
        return {}, (
            f"eo:cloud_cover <= {cfg.max_cloud:g} filtered client-side only (unknown API: a query/filter it "
            "does not implement may silently return nothing)"
        )
    if not profile.server_side_query:
        return {}, f"eo:cloud_cover <= {cfg.max_cloud:g} filtered client-side only (profile {profile.name})"
    if client.conforms_to(ConformanceClasses.QUERY):
        return {"query": {"eo:cloud_cover": {"lte": cfg.max_cloud}}}, (
            f"eo:cloud_cover <= {cfg.max_cloud:g} filtered server-side (query extension) and client-side"
        )
    if client.conforms_to(ConformanceClasses.FILTER):
        cql2 = {"op": "<=", "args": [{"property": "eo:cloud_cover"}, cfg.max_cloud]}
        return {"filter": cql2, "filter_lang": "cql2-json"}, (
            f"eo:cloud_cover <= {cfg.max_cloud:g} filtered server-side (CQL2 filter) and client-side"
        )
    return {}, (
        f"eo:cloud_cover <= {cfg.max_cloud:g} filtered client-side only: the API advertises neither the "
        "query nor the filter extension"
    )


def _api_items(
    url: str, cfg: RunConfig, profile: Profile | None = None, *, limit: int | None = None
) -> tuple[list[dict[str, Any]], list[str]]:
    """Search a STAC API with pystac-client, following every ``next`` link, as plain dicts (no migration).

    Returns the item dicts (each once, in server order) and notes on how the search was done. ``limit``
    overrides the page size (default: the profile's ``page_limit``, else :data:`DEFAULT_PAGE_LIMIT`).
    """
    from pystac_client import Client
    from pystac_client.exceptions import APIError
    from pystac_client.stac_api_io import StacApiIO

    from .http import stac_retry, stac_timeout

    page_limit = limit or (profile.page_limit if profile else DEFAULT_PAGE_LIMIT)
    notes: list[str] = []
    shown = scrub(url)  # what messages and notes say: no credentials, no query string (API keys)
    try:
        # The timeout must be given to Client.open too: it resets the StacApiIO's timeout to its own argument.
        client = Client.open(
            url, stac_io=StacApiIO(max_retries=stac_retry(), timeout=stac_timeout()), timeout=stac_timeout()
        )
        method = _search_method(client)
        kwargs: dict[str, Any] = dict(
            method=method,
            bbox=cfg.bbox.as_tuple(),
            datetime=f"{cfg.start.isoformat()}T00:00:00Z/{cfg.end.isoformat()}T23:59:59.999Z",
            limit=page_limit,
        )
        if profile is not None:
            kwargs["collections"] = list(profile.collections)
        cloud_kwargs, cloud_note = _cloud_filter(client, cfg, profile)
        kwargs.update(cloud_kwargs)
        seen: set[tuple[Any, Any]] = set()
        out: list[dict[str, Any]] = []
        pages = duplicates = 0
        for page in client.search(**kwargs).pages_as_dicts():
            pages += 1
            features = [f for f in page.get("features") or [] if isinstance(f, dict)]
            new = 0
            for feat in features:
                key = (feat.get("collection"), feat.get("id"))
                if key in seen:
                    duplicates += 1
                    continue
                seen.add(key)
                out.append(feat)
                new += 1
            if features and not new:
                raise CatalogError(
                    f"STAC API {shown} sent page {pages} with only items of earlier pages: its 'next' links go "
                    "round in a loop; report it to the provider, or search a shorter period"
                )
    except APIError as e:
        code = getattr(e, "status_code", None)
        if code is None:  # pystac-client wraps connection errors and timeouts in APIError too
            raise CatalogError(
                f"cannot search STAC API {shown}: {scrub(str(e))[:300]}; check the URL and the network (requests were "
                "retried on timeouts and dropped connections), or pass a local item-collection file"
            ) from None
        raise CatalogError(
            f"STAC API {shown} refused the search HTTP {code}: {scrub(str(e))[:300]}; check the URL and the "
            "collection (429/5xx answers and timeouts were retried)"
        ) from None
    except CatalogError:
        raise
    except Exception as e:  # connection errors, JSON errors, not an API
        raise CatalogError(
            f"cannot search STAC API {shown}: {type(e).__name__}: {scrub(str(e))[:300]}; check the URL (a STAC API "
            "root with /search) or pass a local item-collection file"
        ) from None
    colls = ",".join(profile.collections) if profile else "all"
    notes.append(
        f"searched {shown} ({method} /search, collections {colls}, limit {page_limit}): {len(out)} items in "
        f"{pages} page(s)"
    )
    if duplicates:
        notes.append(f"{duplicates} item(s) sent twice by the API were kept once")
    notes.append(cloud_note)
    return out, notes


def _local_policy(catalog: str, cfg: RunConfig) -> HrefPolicy:
    """The href policy of a local catalog file: local hrefs inside its folder tree."""
    path = urllib.request.url2pathname(urllib.parse.urlsplit(catalog).path) if catalog.startswith("file://") \
        else os.path.expanduser(catalog)
    return HrefPolicy(remote=False, root=os.path.dirname(os.path.realpath(path)), allow_local=cfg.allow_local)


def prepare_sample(
    echo: Callable[[str], Any],
    *,
    after: float = 1.0,
    cache_dir: str | os.PathLike[str] | None = None,
    spec: Any = None,
) -> str:
    """Path of the embedded sample's ``items.json`` (:func:`ndvi_scale.sample.sample_catalog`), telling ``echo``
    when it has to be generated: one line once generation has taken ``after`` seconds (the first run must not be
    silent for a minute), one line when it is done (where, how long). A cached sample returns at once, silently.
    ``cache_dir``/``spec`` go to ``sample_catalog``. Raises :class:`CatalogError` for an unwritable cache."""
    import threading
    import time

    from .sample import sample_catalog

    started, wall = time.monotonic(), time.time()
    announced = threading.Event()

    def announce() -> None:
        announced.set()
        echo("generating the embedded sample catalog (first use only, about a minute)...")

    timer = threading.Timer(after, announce)
    timer.daemon = True
    timer.start()
    try:
        path = sample_catalog(os.fspath(cache_dir) if cache_dir is not None else None, spec=spec)
    finally:
        timer.cancel()
    if announced.is_set() and path.stat().st_mtime >= wall - 1:  # generated now, not found in the cache
        echo(f"sample catalog generated in {time.monotonic() - started:.0f} s into {path.parent} (kept for later "
             "runs; NDVI_SCALE_CACHE chooses the folder)")
    return str(path)


def search(cfg: RunConfig) -> SearchResult:
    """Find the usable scenes for ``cfg``; raise :class:`NoScenesError` if there are none."""
    from .profiles import get_profile, profile_for_url

    cat = cfg.catalog
    shown = scrub(cat)  # for messages and provenance: no credentials, no query string (API keys)
    profile_name: str | None = None
    notes: list[str] = []
    if cat in _SAMPLE_NAMES:
        from .sample import sample_catalog

        path = str(sample_catalog())
        raw, base = read_items(path)
        items, skipped = filter_items(raw, cfg, base_href=base, hrefs=_local_policy(path, cfg))
        source = f"sample catalog ({path})"
    elif _is_url(cat) and not cat.lower().endswith(".json"):
        prof = profile_for_url(cat)
        if prof is not None:
            profile_name = prof.name
            notes.append(
                f"{shown} is the API of profile {prof.name}: searching its collections "
                f"{', '.join(prof.collections)} (pass --catalog <profile> to choose another, see ndvi-scale "
                "catalogs)"
            )
        raw, api_notes = _api_items(cat, cfg, prof)
        notes += api_notes
        items, skipped = filter_items(raw, cfg, aliases=prof.assets if prof else None,
                                      hrefs=HrefPolicy(remote=True, allow_local=cfg.allow_local))
        source = f"STAC API {shown}"
    elif _is_file_like(cat):
        raw, base = read_items(cat)
        policy = (HrefPolicy(remote=True, allow_local=cfg.allow_local) if _is_url(cat)
                  else _local_policy(cat, cfg))
        items, skipped = filter_items(raw, cfg, base_href=base, hrefs=policy)
        source = f"item collection {shown}"
    else:
        prof = get_profile(cat)
        profile_name = prof.name
        raw, api_notes = _api_items(prof.url, cfg, prof)
        notes += api_notes
        items, skipped = filter_items(raw, cfg, aliases=prof.assets,
                                      hrefs=HrefPolicy(remote=True, allow_local=cfg.allow_local))
        source = f"{prof.title} ({prof.url})"
    result = SearchResult(
        tuple(items), tuple(skipped), source=source, profile=profile_name, notes=tuple(notes)
    )
    if not items:
        reasons = result.skipped_reasons().most_common(3)
        why = f"; {len(skipped)} skipped ({', '.join(f'{r} x{n}' for r, n in reasons)})" if skipped else ""
        covers = _coverage_clause(cfg, raw if cat in _SAMPLE_NAMES or _is_file_like(cat) else [],
                                  "the sample catalog" if cat in _SAMPLE_NAMES else "the catalog")
        raise NoScenesError(
            f"no Sentinel-2 L2A scenes found in {source} for bbox {cfg.bbox} between {cfg.start} and "
            f"{cfg.end} with cloud cover <= {cfg.max_cloud:g}%{why}; {covers}widen the bbox or the dates, raise "
            "--max-cloud, or check the catalog"
        )
    return result


def catalog_extent(raw: Sequence[Any]) -> tuple[tuple[float, float, float, float], dt.date, dt.date] | None:
    """(W, S, E, N) and first/last day of the items of a local catalog (their ``bbox`` and ``datetime``), or
    None if none of them states both."""
    boxes: list[list[float]] = []
    days: list[dt.date] = []
    for it in raw:
        if not isinstance(it, Mapping):
            continue
        box = _finite_numbers(it.get("bbox"))
        when = (it.get("properties") or {}).get("datetime") if isinstance(it.get("properties"), Mapping) else None
        try:
            day = dt.datetime.fromisoformat(str(when).replace("Z", "+00:00")).date()
        except ValueError:
            continue
        if box is not None and len(box) == 4:
            boxes.append(box)
            days.append(day)
    if not boxes:
        return None
    w, s, e, n = (min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes),
                  max(b[3] for b in boxes))
    return (round(w, 3), round(s, 3), round(e, 3), round(n, 3)), min(days), max(days)


def _coverage_clause(cfg: RunConfig, raw: Sequence[Any], what: str) -> str:
    """``the sample catalog covers bbox ... in 2024; your bbox would match with ... swapped: --bbox ...; `` for a
    no-scenes error, or "" when the catalog's extent is unknown (a STAC API is not listed for it)."""
    from .hints import coverage_hint

    extent = catalog_extent(raw)
    if extent is None:
        return ""
    box, first, last = extent
    text = coverage_hint(cfg.bbox.as_tuple(), cfg.start, cfg.end, box, first, last, what)
    return f"{text}; " if text else ""
