"""Read faults: what happens when an asset (one COG of one item) cannot be read.

Three layers, innermost first:

1. **Per HTTP request** (GDAL, :func:`ndvi_scale.http.gdal_retry_options`): 408/429/5xx answers, timeouts and
   dropped connections are retried by GDAL itself with capped exponential backoff.
2. **Per asset read** (:class:`ReadPolicy`, applied by :class:`ndvi_scale.engine.reader.AssetReader`): a read that still
   fails (the server kept failing, the file is truncated, a signature expired, the connection broke mid-tile)
   is tried again from scratch, :data:`READ_ATTEMPTS` times in all, :data:`READ_BACKOFF` seconds apart
   (doubling). Each new attempt drops the open dataset handles and GDAL's cached state of the file (GDAL keeps
   a failed answer and the size of a truncated file in its ``/vsicurl/`` cache, so a plain retry would fail
   again without asking the server), and re-signs the href (:attr:`ReadPolicy.resign`: Planetary Computer SAS
   tokens expire after ~45 minutes, a long run outlives them).
3. **Then** either the run fails with :class:`~ndvi_scale.errors.ReadError`, whose message lists every asset
   that failed (what the reads recorded in :class:`FaultLog` before the run stopped), regions already written
   being kept for a resume; or, with ``--skip-bad-assets`` (:attr:`ReadPolicy.skip`), the asset's pixels of
   that chunk count as not observed (like a cloud: ``valid_count`` says how many observations are left) and the
   asset is recorded: in the cube's ``ndvi_scale_skipped_assets`` attribute, in its STAC item and in the CLI
   summary. Never a silent hole.

Records are small JSON objects in the output store (``.ndvi-scale/skipped/`` and ``.ndvi-scale/failed/``,
written by whichever worker read the asset, so they work on every Dask scheduler) and are folded into the
cube's attributes when the write finishes. Hrefs are recorded without their query string: signatures are
credentials.

The per-asset numbers can be tuned without code: ``NDVI_SCALE_READ_ATTEMPTS`` and ``NDVI_SCALE_READ_BACKOFF``
(seconds); GDAL's per-request ones through the usual ``GDAL_HTTP_*`` variables (see :mod:`ndvi_scale.http`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .errors import ReadError, exception_chain

__all__ = [
    "READ_ATTEMPTS",
    "READ_BACKOFF",
    "AssetFault",
    "AssetReadError",
    "FaultLog",
    "ReadPolicy",
    "SkippedAssetWarning",
    "clean_href",
    "describe_summary",
    "error_text",
    "merge_summaries",
    "scrub",
    "scrub_value",
    "summarise",
]

#: Attempts per asset read in all (each one after GDAL's own per-request retries). Three: a fault that
#: survives GDAL's five retries and two fresh re-opens a few seconds apart is not transient.
READ_ATTEMPTS = 3

#: Seconds before the second attempt, doubled for each further one (2, 4, ... capped at
#: :data:`READ_BACKOFF_MAX`): long enough for a load balancer to move a client off a sick node.
READ_BACKOFF = 2.0

#: Cap of one wait between attempts (seconds).
READ_BACKOFF_MAX = 30.0

# A URL's credentials: ``user:password@`` right after ``scheme://``.
_USERINFO = re.compile(r"(?<=://)[^/\s@'\"<>]*@")
# A URL's query string and fragment (signatures, tokens, API keys): from ``?`` or ``#`` after ``scheme://host``
# to the end of the URL (whitespace, a quote or an angle bracket end it, as in messages and JSON).
_URL_QUERY = re.compile(r"(://[^\s'\"<>?#]*)[?#][^\s'\"<>]*")


def clean_href(url: str) -> str:
    """``url`` without its credentials (``user:password@``), query string and fragment (signatures, tokens,
    subscription keys): safe to print, to log and to store. THE one function for this: every URL that can reach
    a message, a log, a cube attribute, a STAC item or a fault record goes through it (or :func:`scrub`)."""
    url = str(url)
    if "://" in url:
        url = _USERINFO.sub("", url, count=1)
    return re.split(r"[?#]", url, maxsplit=1)[0]


def scrub(text: str) -> str:
    """``text`` with every URL in it cleaned as by :func:`clean_href` (free text: messages, JSON strings)."""
    text = str(text)
    if "://" not in text:
        return text
    return _URL_QUERY.sub(r"\1", _USERINFO.sub("", text))


def scrub_value(value: Any) -> Any:
    """A copy of a JSON-like value (dicts, lists, strings) with every string passed through :func:`scrub`."""
    if isinstance(value, str):
        return scrub(value)
    if isinstance(value, Mapping):
        return {k: scrub_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [scrub_value(v) for v in value]
    return value


def error_text(exc: BaseException) -> str:
    """The innermost cause of ``exc`` on one line, without URL credentials or query strings (signatures)."""
    root = exception_chain(exc)[-1]
    text = " ".join(str(root).split()) or type(root).__name__
    text = text.replace("See previous exception for details.", "").strip()
    return scrub(f"{type(root).__name__}: {text}")


def _env_number(name: str, default: float, minimum: float) -> float:
    raw = os.environ.get(name, "").strip()
    try:
        return max(minimum, float(raw)) if raw else default
    except ValueError:
        return default


@dataclass(frozen=True)
class AssetFault:
    """One asset that could not be read for one output window, after every attempt."""

    href: str
    """The asset's href without query string."""
    window: tuple[int, int, int, int]
    """The output window (row offset, column offset, height, width) the read was for."""
    error: str
    """The last error, one line, without secrets."""
    attempts: int
    """How many times the read was tried."""
    skipped: bool
    """True if the run went on without it (``--skip-bad-assets``), False if it failed the run."""

    def key(self) -> str:
        return hashlib.sha1(f"{self.href}|{self.window}".encode()).hexdigest()[:20]

    def to_dict(self) -> dict[str, Any]:
        return {"href": clean_href(self.href), "window": list(self.window), "error": scrub(self.error),
                "attempts": self.attempts, "skipped": self.skipped}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> AssetFault:
        w = tuple(int(v) for v in d["window"])
        return cls(str(d["href"]), (w[0], w[1], w[2], w[3]), str(d["error"]), int(d["attempts"]),
                   bool(d["skipped"]))

    def describe(self) -> str:
        plural = "s" if self.attempts != 1 else ""
        return f"{clean_href(self.href)}: {scrub(self.error)} (after {self.attempts} attempt{plural})"


class SkippedAssetWarning(UserWarning):
    """An asset was skipped for one window (``--skip-bad-assets``). The CLI lists skipped assets in its summary
    instead of showing these."""


class AssetReadError(ReadError):
    """An asset could not be read after every attempt (raised in the Dask task; picklable)."""

    def __init__(self, fault: AssetFault) -> None:
        super().__init__(
            f"cannot read {fault.describe()}; check the href and the network, or pass --skip-bad-assets to "
            "compose without it (it is then recorded in the output)"
        )
        self.fault = fault

    def __reduce__(self) -> tuple[Any, ...]:
        return (AssetReadError, (self.fault,))


#: Faults held per (location, prefix) of a :class:`FaultLog` (:meth:`FaultLog.hold`), in this process.
_HELD: dict[tuple[Any, str], list[AssetFault]] = {}
_HELD_LOCK = threading.Lock()


@dataclass(frozen=True)
class FaultLog:
    """Where read faults are recorded: a folder below an output location (picklable, for Dask workers)."""

    location: Any
    """A :class:`ndvi_scale.storage.LocationSpec` of the output."""
    prefix: str = ".ndvi-scale"
    """Folder inside the output; ``skipped/`` and ``failed/`` below it."""

    def _loc(self) -> Any:
        from .storage import location_from_spec

        return location_from_spec(self.location)

    def _dir(self, skipped: bool) -> str:
        return self._loc().join(self.prefix, "skipped" if skipped else "failed")

    def record(self, fault: AssetFault) -> None:
        with _HELD_LOCK:
            held = _HELD.get((self.location, self.prefix))
            if held is not None:  # the output's metadata is being written (hold): kept until release
                held.append(fault)
                return
        self._write(fault)

    def _write(self, fault: AssetFault) -> None:
        loc = self._loc()
        path = f"{self._dir(fault.skipped)}/{fault.key()}.json"
        if loc.is_local:
            os.makedirs(os.path.dirname(path), exist_ok=True)
        loc.fs.pipe_file(path, json.dumps(fault.to_dict()).encode())

    def hold(self) -> None:
        """Keep the faults this process records in memory until :meth:`release`: while a new output's metadata
        is written (which replaces whatever is at the location) beside the first reads."""
        with _HELD_LOCK:
            _HELD.setdefault((self.location, self.prefix), [])

    def release(self) -> None:
        """Record the faults held since :meth:`hold`, and record the next ones at once."""
        with _HELD_LOCK:
            held = _HELD.pop((self.location, self.prefix), [])
        for fault in held:
            self._write(fault)

    def read(self, skipped: bool) -> list[AssetFault]:
        """The faults recorded so far (skipped ones, or the ones that failed the run), held ones included."""
        with _HELD_LOCK:
            out = [f for f in _HELD.get((self.location, self.prefix), []) if f.skipped == skipped]
        loc = self._loc()
        root = self._dir(skipped)
        try:
            paths = [p for p in loc.fs.find(root) if p.endswith(".json")]
        except FileNotFoundError:
            return out
        for p in sorted(paths):
            try:
                out.append(AssetFault.from_dict(json.loads(loc.fs.cat_file(p))))
            except (FileNotFoundError, ValueError, KeyError, TypeError):
                continue  # a record being written right now, or not ours
        return out

    def clear_failed(self) -> None:
        """Forget the failures of an earlier run (a resume reads those assets again)."""
        loc = self._loc()
        root = self._dir(False)
        try:
            found = loc.fs.find(root)
        except FileNotFoundError:
            return
        if found:
            loc.fs.rm(found)


@dataclass(frozen=True)
class ReadPolicy:
    """How readers retry, and what they do with an asset that cannot be read (see the module docstring)."""

    attempts: int = field(default_factory=lambda: int(_env_number("NDVI_SCALE_READ_ATTEMPTS", READ_ATTEMPTS, 1)))
    """Attempts per asset read in all (``NDVI_SCALE_READ_ATTEMPTS``)."""
    backoff: float = field(default_factory=lambda: _env_number("NDVI_SCALE_READ_BACKOFF", READ_BACKOFF, 0.0))
    """Seconds before the second attempt, doubled each time (``NDVI_SCALE_READ_BACKOFF``)."""
    skip: bool = False
    """Go on without an unreadable asset (recorded) instead of failing the run."""
    log: FaultLog | None = None
    """Where faults are recorded (None: only warnings, e.g. a Dataset built without an output)."""
    resign: Callable[[str], str] | None = None
    """Returns a freshly signed href for a (signed or unsigned) href, or None when hrefs need no signing."""

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based)."""
        return min(READ_BACKOFF_MAX, self.backoff * 2 ** (attempt - 1))


def summarise(faults: Iterable[AssetFault], labels: Mapping[str, tuple[str, str]] | None = None
              ) -> list[dict[str, Any]]:
    """Faults grouped per asset, as stored in ``ndvi_scale_skipped_assets``: item, band, href, the windows,
    the last error and attempts. ``labels`` maps a clean href to its (item id, band)."""
    labels = labels or {}
    by_href: dict[str, dict[str, Any]] = {}
    for f in faults:
        entry = by_href.get(f.href)
        if entry is None:
            item, band = labels.get(f.href, ("", ""))
            entry = by_href[f.href] = {"item": item, "band": band, "href": f.href, "windows": [],
                                       "error": f.error, "attempts": f.attempts}
        if list(f.window) not in entry["windows"]:
            entry["windows"].append(list(f.window))
        if f.attempts > entry["attempts"]:  # later chunks of an asset given up on get a single attempt
            entry["error"], entry["attempts"] = f.error, f.attempts
    for entry in by_href.values():
        entry["windows"].sort()
    return [by_href[h] for h in sorted(by_href)]


def merge_summaries(*groups: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Union of :func:`summarise` lists (an append adds to what earlier runs recorded)."""
    by_href: dict[str, dict[str, Any]] = {}
    for group in groups:
        for e in group:
            cur = by_href.setdefault(e["href"], {**e, "windows": []})
            for w in e.get("windows", []):
                if list(w) not in cur["windows"]:
                    cur["windows"].append(list(w))
            cur["error"], cur["attempts"] = e.get("error", cur.get("error")), e.get("attempts", cur.get("attempts"))
    for e in by_href.values():
        e["windows"].sort()
    return [by_href[h] for h in sorted(by_href)]


def describe_summary(entry: Mapping[str, Any]) -> str:
    """One line per asset for messages and the CLI summary."""
    who = f"{entry['item']} {entry['band']} " if entry.get("item") else ""
    n = len(entry.get("windows", []))
    return scrub(f"{who}({entry['href']}): {entry['error']} after {entry['attempts']} attempt(s), "
                 f"{n} chunk{'s' if n != 1 else ''}")
