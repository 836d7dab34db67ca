"""STAC provider profiles: what ndvi-scale knows about each Sentinel-2 L2A provider, kept as data.

One YAML file per provider lives in the ``catalogs/`` data package (installed as ``ndvi_scale.catalogs``).
A profile says where the STAC API is, which collection(s) hold Sentinel-2 L2A, which asset keys are
red/nir/scl, whether hrefs must be signed, what credentials reading needs, the largest page size the server
really serves and whether it filters on ``eo:cloud_cover`` server-side.

Asset aliases have one source of truth: :data:`ndvi_scale.items.DEFAULT_ASSET_ALIASES`. A profile lists its
own keys first and the default table is appended, so ``normalize_item(item, aliases=profile.assets)`` never
knows fewer keys than the default.
"""

from __future__ import annotations

import functools
import importlib.resources
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import yaml

from .errors import CatalogError, shown
from .items import BANDS, DEFAULT_ASSET_ALIASES, NOT_NIR_KEYS

__all__ = ["SIGNING_METHODS", "Profile", "get_profile", "list_profiles", "profile_for_url", "sign_href"]

#: Known href signing methods.
SIGNING_METHODS = ("planetary-computer",)

_PACKAGE = "ndvi_scale.catalogs"
_FIELDS = (
    "name",
    "title",
    "url",
    "collections",
    "assets",
    "signing",
    "auth",
    "page_limit",
    "server_side_query",
    "notes",
)


@dataclass(frozen=True)
class Profile:
    """One STAC provider of Sentinel-2 L2A."""

    name: str
    """Short name used on the command line (``--catalog earth-search``); the YAML file is ``<name>.yaml``."""
    title: str
    url: str
    """STAC API root URL."""
    collections: tuple[str, ...]
    """Collection ids holding Sentinel-2 L2A on this API (search only these: APIs also hold Landsat...)."""
    assets: Mapping[str, tuple[str, ...]]
    """Asset keys per band (``red``, ``nir``, ``scl``): the provider's keys first, then the default table."""
    signing: str | None
    """``"planetary-computer"`` (hrefs need a SAS token, see :func:`sign_href`) or None."""
    auth: str | None
    """What reading the pixels needs (credentials, environment variables), as text; None if public."""
    page_limit: int
    """Largest ``limit`` per search page the server handles reliably."""
    server_side_query: bool
    """True if the API filters ``eo:cloud_cover`` itself (``query`` extension or CQL2 ``filter``)."""
    notes: str

    def to_dict(self) -> dict[str, Any]:
        """JSON/YAML-friendly view (``ndvi-scale catalogs``)."""
        return {
            "name": self.name,
            "title": self.title,
            "url": self.url,
            "collections": list(self.collections),
            "assets": {band: list(keys) for band, keys in self.assets.items()},
            "signing": self.signing,
            "auth": self.auth,
            "page_limit": self.page_limit,
            "server_side_query": self.server_side_query,
            "notes": self.notes,
        }


def _merge_aliases(own: Mapping[str, Iterable[str]]) -> Mapping[str, tuple[str, ...]]:
    merged: dict[str, tuple[str, ...]] = {}
    for band in BANDS:
        keys: list[str] = []
        for key in list(own.get(band, ())) + list(DEFAULT_ASSET_ALIASES[band]):
            if key not in keys:
                keys.append(key)
        merged[band] = tuple(keys)
    return MappingProxyType(merged)


def _bad(where: str, field: str, value: Any, expected: str) -> CatalogError:
    return CatalogError(
        f"catalog profile {where}: {field} {shown(value)} is invalid; expected {expected}. Fix the YAML file"
    )


def _profile_from_yaml(text: str, where: str, stem: str) -> Profile:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise CatalogError(f"catalog profile {where} is not valid YAML ({e}); fix the file") from None
    if not isinstance(data, Mapping):
        raise CatalogError(
            f"catalog profile {where} is not a YAML mapping; expected the fields {', '.join(_FIELDS)}"
        )
    missing = [f for f in _FIELDS if f not in data]
    if missing:
        raise CatalogError(
            f"catalog profile {where} lacks {', '.join(missing)}; expected all of {', '.join(_FIELDS)}"
        )
    unknown = sorted(set(map(str, data)) - set(_FIELDS))
    if unknown:
        raise CatalogError(
            f"catalog profile {where} has unknown field(s) {', '.join(unknown)}; expected {_FIELDS}"
        )

    name = data["name"]
    if not isinstance(name, str) or name != stem:
        raise _bad(where, "name", name, f"the file name without .yaml ({shown(stem)})")
    url = data["url"]
    if not isinstance(url, str) or not url.startswith(("https://", "http://")):
        raise _bad(where, "url", url, "the STAC API root URL (https://...)")
    colls = data["collections"]
    if isinstance(colls, str):
        colls = [colls]
    if not isinstance(colls, list) or not colls or not all(isinstance(c, str) and c for c in colls):
        raise _bad(where, "collections", colls, "a non-empty list of collection ids")
    assets = data["assets"]
    if not isinstance(assets, Mapping) or set(assets) - set(BANDS):
        raise _bad(where, "assets", assets, f"a mapping with keys among {', '.join(BANDS)}")
    own: dict[str, list[str]] = {}
    for band, keys in assets.items():
        if isinstance(keys, str):
            keys = [keys]
        if not isinstance(keys, list) or not all(isinstance(k, str) and k for k in keys):
            raise _bad(where, f"assets.{band}", keys, "a list of asset keys")
        if band == "nir" and set(keys) & NOT_NIR_KEYS:
            raise _bad(
                where, "assets.nir", keys, "band 8 (10 m) keys only: nir08/B8A are band 8A, not NDVI's NIR"
            )
        own[str(band)] = keys
    signing = data["signing"]
    if signing is not None and signing not in SIGNING_METHODS:
        raise _bad(where, "signing", signing, f"null or one of {', '.join(SIGNING_METHODS)}")
    auth = data["auth"]
    if auth is not None and not isinstance(auth, str):
        raise _bad(where, "auth", auth, "null or a text")
    page_limit = data["page_limit"]
    if isinstance(page_limit, bool) or not isinstance(page_limit, int) or not 1 <= page_limit <= 10000:
        raise _bad(where, "page_limit", page_limit, "an integer 1-10000")
    ssq = data["server_side_query"]
    if not isinstance(ssq, bool):
        raise _bad(where, "server_side_query", ssq, "true or false")
    for field in ("title", "notes"):
        if not isinstance(data[field], str) or not data[field].strip():
            raise _bad(where, field, data[field], "a non-empty text")
    return Profile(
        name=name,
        title=data["title"].strip(),
        url=url.rstrip("/"),
        collections=tuple(colls),
        assets=_merge_aliases(own),
        signing=signing,
        auth=auth.strip() if isinstance(auth, str) else None,
        page_limit=page_limit,
        server_side_query=ssq,
        notes=data["notes"].strip(),
    )


def _catalog_texts() -> list[tuple[str, str, str]]:
    """(stem, where, text) of every profile YAML: from the installed ``ndvi_scale.catalogs`` package, else
    (source tree, not installed) from the repository's ``catalogs/`` folder."""
    try:
        root = importlib.resources.files(_PACKAGE)
        entries = [e for e in root.iterdir() if e.name.endswith(".yaml")]
    except (ModuleNotFoundError, TypeError, FileNotFoundError, NotADirectoryError):
        entries = []
    if entries:
        return [
            (e.name[: -len(".yaml")], f"{_PACKAGE}/{e.name}", e.read_text(encoding="utf-8")) for e in entries
        ]
    folder = Path(__file__).resolve().parents[2] / "catalogs"
    files = sorted(folder.glob("*.yaml")) if folder.is_dir() else []
    if not files:
        raise CatalogError(
            f"no catalog profiles found (package {_PACKAGE} is not installed and {folder} has no *.yaml); "
            "reinstall ndvi-scale"
        )
    return [(f.stem, str(f), f.read_text(encoding="utf-8")) for f in files]


@functools.lru_cache(maxsize=1)
def _load_profiles() -> tuple[Profile, ...]:
    profiles = [_profile_from_yaml(text, where, stem) for stem, where, text in _catalog_texts()]
    return tuple(sorted(profiles, key=lambda p: p.name))


def list_profiles() -> list[Profile]:
    """All provider profiles, sorted by name."""
    return list(_load_profiles())


def get_profile(name: str) -> Profile:
    """The profile called ``name`` (case-insensitive); else :class:`CatalogError` listing the valid names."""
    profiles = _load_profiles()
    key = name.strip().lower() if isinstance(name, str) else name
    for p in profiles:
        if p.name == key:
            return p
    names = ", ".join(p.name for p in profiles)
    raise CatalogError(
        f"catalog {shown(name)} is unknown; expected 'sample', one of {names}, a STAC API URL (http...) or a "
        "path to an item collection JSON"
    )


def profile_for_url(url: str) -> Profile | None:
    """The first profile (by name) whose API root is ``url`` (trailing ``/`` ignored), or None.

    Useful when a user passes a bare API URL: e.g. the Planetary Computer URL still needs href signing.
    Earth Search v1 serves two profiles (earth-search, earth-search-c1) that differ only by collection.
    """
    if not isinstance(url, str):
        return None
    u = url.strip().rstrip("/").lower()
    for p in _load_profiles():
        if p.url.lower() == u:
            return p
    return None


def sign_href(profile: Profile | str | None, href: str) -> str:
    """Return ``href`` ready to read for ``profile``: signed for the Planetary Computer, unchanged otherwise.

    Planetary Computer signing calls the PC token endpoint (network) and tokens expire after ~45 minutes:
    call this when opening a file, not when searching.
    """
    if profile is None:
        return href
    p = get_profile(profile) if isinstance(profile, str) else profile
    if p.signing is None:
        return href
    if p.signing == "planetary-computer":
        try:
            import planetary_computer
        except ImportError:
            raise CatalogError(
                f"catalog {p.name} needs href signing, but the planetary-computer package is not installed; "
                "pip install planetary-computer"
            ) from None
        try:
            signed = planetary_computer.sign(href)
        except Exception as e:  # network, HTTP or token errors from the PC SDK
            raise CatalogError(
                f"could not sign {href} for {p.name} ({type(e).__name__}: {e}); check the network, or set "
                "PC_SDK_SUBSCRIPTION_KEY"
            ) from None
        if not isinstance(signed, str):
            raise CatalogError(
                f"Planetary Computer signing returned {type(signed).__name__} for {href}; expected a URL"
            )
        return signed
    raise CatalogError(
        f"catalog {p.name} has signing {shown(p.signing)}; expected null or one of {SIGNING_METHODS}"
    )


def resign_href(profile: str, href: str) -> str:
    """``href`` signed afresh for ``profile`` (any old signature dropped first): used before retrying a read
    whose token may have expired mid-run. Picklable as ``functools.partial(resign_href, name)``."""
    return sign_href(profile, href.split("?", 1)[0])
