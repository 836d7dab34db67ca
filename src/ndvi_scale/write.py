"""Write stage: a lazy NDVI composite Dataset -> a resumable, appendable Zarr cube (local path, gs://, s3://).

How a write goes (:func:`write_cube`):

1. **Template.** Metadata and coordinates are written first (``to_zarr(compute=False)``), with a *write
   state* in the root attributes (``ndvi_scale_write``: run fingerprint, periods being written, phase).
2. **Regions.** The data is written region by region, where a region is one output chunk: one period x one
   (y, x) block, i.e. exactly one Zarr chunk of every data variable. Why one chunk and not one period: each
   task then owns whole chunks (no two tasks touch the same object, no read-modify-write), its memory is
   bounded by one chunk's inputs, there are enough tasks to keep every core busy even for a single period,
   and a crash loses at most the regions in flight. All missing regions go into ONE dask computation
   (threaded scheduler, or the active ``distributed`` client); each task writes its chunks and then a
   zero-byte **marker** object ``.ndvi-scale/done/<period>/<yblock>-<xblock>`` inside the store. Markers are
   independent objects (no shared counter to update, so no races and no rate limit on one hot object) and
   listing them is one call.
3. **Finish.** The write state becomes ``complete``, the markers are removed (so finished cubes hold nothing
   but Zarr), metadata is consolidated and a STAC Item is written beside the store (``<out>.stac-item.json``).

**Resume**: an unfinished store whose fingerprint (hash of config + items + grid + periods) equals this run's
is finished instead of refused: only regions without a marker are computed; finished chunks are never
rewritten. Computation is deterministic, so a resumed cube is bit-for-bit the cube of an uninterrupted run.

**Append**: periods not yet in the cube are added along ``time`` (the grid must match exactly); periods
already there are skipped, or recomputed in place with ``overwrite``. An append goes through the same
template/regions/finish phases, so it is resumable too.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import logging
import math
import os
import posixpath
import re
import shutil
import threading
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, cast

import dask
import dask.array as da
import numpy as np
import rioxarray  # noqa: F401  (registers the .rio accessor used for the CRS)
import xarray as xr
from dask.callbacks import Callback

from .cf import COUNT_FILL, DATE_STEP, LEGACY_PREFIX, date_encoding, gdal_crs_attr, get_attr, merge_history
from .errors import (
    GridMismatchError,
    InputError,
    NdviScaleError,
    OutputError,
    OutputExistsError,
    ReadError,
    exception_chain,
)
from .faults import AssetReadError, FaultLog, describe_summary, merge_summaries, scrub_value, summarise
from .storage import (
    Location,
    LocationSpec,
    location_from_spec,
    open_location,
    redact,
    storage_error,
    store_from_spec,
)

__all__ = [
    "WriteReport",
    "write_cube",
    "check_output",
    "write_zarr",
    "run_fingerprint",
    "prepare_dataset",
    "stac_item_dict",
    "CUBE_ATTR",
    "WRITE_ATTR",
    "RUNS_ATTR",
    "MARKER_PREFIX",
    "LEASE_SUFFIX",
    "WriterLease",
]

log = logging.getLogger(__name__)

# Root attribute names are CF-legal (``ndvi_scale_*``); cubes written before used ``ndvi_scale:*`` (see
# ndvi_scale.cf.LEGACY_PREFIX): they are still recognised, and renamed when a write finishes in them.
#: Root attribute that tags a store as an ndvi-scale cube (value: layout version).
CUBE_ATTR = "ndvi_scale_cube"
#: Root attribute (JSON string) holding the write state: fingerprint, state, periods, n_before.
WRITE_ATTR = "ndvi_scale_write"
#: Root attribute (JSON string): one entry per run that wrote periods (fingerprint, periods, software).
RUNS_ATTR = "ndvi_scale_runs"
#: Prefix (inside the store) of the progress markers; removed when a write completes.
MARKER_PREFIX = ".ndvi-scale"
MARKER_DIR = f"{MARKER_PREFIX}/done"
#: Metadata object that makes :data:`MARKER_PREFIX` an empty Zarr group, per Zarr format (path parts, bytes).
_STATE_GROUP_DOC: dict[int, tuple[tuple[str, ...], bytes]] = {
    3: ((MARKER_PREFIX, "zarr.json"), b'{"zarr_format": 3, "node_type": "group", "attributes": '
        b'{"description": "ndvi-scale run state of an unfinished write, removed when it completes"}}'),
    2: ((MARKER_PREFIX, ".zgroup"), b'{"zarr_format": 2}'),
}
#: Chunk length of the 1-D coordinates along time: one object for up to 512 periods.
TIME_COORD_CHUNK = 512
STAC_SUFFIX = ".stac-item.json"
#: Cube attribute listing every asset the cube was composed without (``--skip-bad-assets``), JSON.
SKIPPED_ATTR = "ndvi_scale_skipped_assets"
#: The same list in the STAC item's properties (STAC names custom fields ``prefix:name``).
STAC_SKIPPED_PROP = "ndvi_scale:skipped_assets"
#: Media type of the cube asset (Zarr's registered type; the version parameter tells readers the format).
ZARR_MEDIA_TYPE = "application/vnd.zarr"
PROJECTION_EXT = "https://stac-extensions.github.io/projection/v2.0.0/schema.json"
XARRAY_ASSETS_EXT = "https://stac-extensions.github.io/xarray-assets/v1.0.0/schema.json"
PROCESSING_EXT = "https://stac-extensions.github.io/processing/v1.2.0/schema.json"
DATACUBE_EXT = "https://stac-extensions.github.io/datacube/v2.3.0/schema.json"
#: The extensions the cube's STAC item declares (:func:`stac_item_dict`), in its order.
STAC_ITEM_EXTENSIONS = (PROJECTION_EXT, DATACUBE_EXT, XARRAY_ASSETS_EXT, PROCESSING_EXT)
#: Compression of the chunks of a new cube (``codec=``/``--codec``); see :func:`compressors`.
CODECS = ("zstd", "zlib", "lz4", "none")
DEFAULT_CODEC = "zstd"
_CUBE_DIMS = ("time", "y", "x")
_CUBE_LAYOUT = "1"
# Encoding keys that change the stored values (what xarray's CF encoder needs to reproduce them).
_CF_ENCODING_KEYS = (
    "units",
    "calendar",
    "dtype",
    "_FillValue",
    "missing_value",
    "scale_factor",
    "add_offset",
)
# Time coordinates are stored as integer seconds: the units stay valid for any period appended later (xarray
# would otherwise pick "days since <first period>" and refuse a later value that is not a whole day).
_TIME_ENCODING = {
    "units": "seconds since 1970-01-01 00:00:00",
    "calendar": "proleptic_gregorian",
    "dtype": "int64",
}

ProgressCallback = Callable[[int, int], None]
ZarrFormat = Literal[2, 3]


@dataclass(frozen=True)
class WriteReport:
    """What :func:`write_cube` did."""

    url: str
    """Credential-free URL of the cube."""
    stac_item_url: str | None
    """URL of the STAC Item written beside the cube (None when nothing was written)."""
    zarr_format: int
    regions_total: int
    """Regions (period x y-block x x-block) covering every period of the dataset given."""
    regions_written: int
    """Regions computed and written by this call."""
    regions_skipped: int
    """Regions already in the store (finished before a resume, or in skipped periods)."""
    periods_written: tuple[str, ...]
    periods_skipped: tuple[str, ...]
    resumed: bool
    """True if this call finished an interrupted write."""
    fingerprint: str
    waves: int = 0
    """Waves the regions were computed in (:mod:`ndvi_scale.waves`; 0: nothing computed)."""
    skipped_assets: tuple[dict[str, Any], ...] = ()
    """Assets this write went on without (``--skip-bad-assets``), per asset: item, band, href, windows, error
    (see :func:`ndvi_scale.faults.summarise`). Also in the cube's ``ndvi_scale_skipped_assets``."""


# ------------------------------------------------------------------------------------------------- public API


def write_cube(
    ds: xr.Dataset,
    location_or_url: Location | str,
    *,
    overwrite: bool = False,
    append: bool = False,
    zarr_format: int | None = None,
    progress: ProgressCallback | None = None,
    storage_options: Mapping[str, Any] | None = None,
    fingerprint: str | None = None,
    faults: FaultLog | None = None,
    asset_labels: Mapping[str, tuple[str, str]] | None = None,
    codec: str | None = None,
    start_reading: Callable[[], Any] | None = None,
) -> WriteReport:
    """Write the lazy composite ``ds`` (dims time, y, x) as a Zarr cube at ``location_or_url``.

    * New output: written from scratch (Zarr ``zarr_format`` 3 by default, or 2). An existing cube keeps its
      format: a ``zarr_format`` other than the cube's is refused (:class:`GridMismatchError`) unless the cube
      is replaced (``overwrite`` without ``append``).
    * Unfinished output of the same run (same fingerprint): resumed, computing only the missing regions.
    * Existing finished output: :class:`~ndvi_scale.errors.OutputExistsError` unless ``append`` (add new
      periods, skip existing ones) or ``overwrite`` (replace the store; with ``append``: recompute existing
      periods).
    * Anything else at the path (a file, another Zarr, a non-empty folder): refused unless ``overwrite``.

    ``progress(done, total)`` is called as regions finish. ``fingerprint`` overrides :func:`run_fingerprint`.
    ``faults`` is where the readers of ``ds`` record assets they could not read (see :mod:`ndvi_scale.faults`;
    ``asset_labels`` names them: clean href -> (item id, band)): skipped ones end up in the cube's
    ``ndvi_scale_skipped_assets`` and the report, failed ones in the :class:`~ndvi_scale.errors.ReadError`.
    ``codec`` compresses the chunks of a new cube (one of :data:`CODECS`; default: the ``codec`` of the run
    config in ``ds``'s attributes, else :data:`DEFAULT_CODEC`); an existing cube keeps its own.
    ``start_reading()`` is called before a new cube's template is written, on the local schedulers only (the
    pipeline starts the first period's reads there, so they overlap the template's writes).
    Returns a :class:`WriteReport`. Storage failures raise one :class:`~ndvi_scale.errors.StorageError`.
    """
    if zarr_format is not None and zarr_format not in (2, 3):
        raise InputError(f"zarr_format {str(zarr_format)[:20]!r} is invalid; expected 2 or 3")
    codec = _codec_of(ds, codec)
    _quiet_marker_warnings()
    loc = (
        location_or_url
        if isinstance(location_or_url, Location)
        else open_location(str(location_or_url), storage_options)
    )
    _refuse_bucket_root(loc)
    ds = prepare_dataset(ds)
    loc.check_access()
    prepare_stac_item()
    with WriterLease(loc) as lease:  # one writer at a time: a second one is refused naming the holder
        return _write_cube_leased(ds, loc, overwrite=overwrite, append=append, zarr_format=zarr_format,
                                  progress=progress, fingerprint=fingerprint, faults=faults,
                                  asset_labels=asset_labels, codec=codec, lease=lease,
                                  start_reading=start_reading)


def _write_cube_leased(
    ds: xr.Dataset,
    loc: Location,
    *,
    overwrite: bool,
    append: bool,
    zarr_format: int | None,
    progress: ProgressCallback | None,
    fingerprint: str | None,
    faults: FaultLog | None,
    asset_labels: Mapping[str, tuple[str, str]] | None,
    codec: str,
    lease: WriterLease | None = None,
    start_reading: Callable[[], Any] | None = None,
) -> WriteReport:
    """:func:`write_cube` once the writer lease is held: everything is inspected again under it."""
    existing = _inspect(loc)
    _refuse_other_format(loc, existing, zarr_format, overwrite=overwrite, append=append)
    if lease is not None:
        lease.verify()  # still ours after the inspection, before the first write (see WriterLease.verify)
    new_format = zarr_format or 3
    writer = _Writer(loc, ds, progress, fingerprint, faults, asset_labels, codec, start_reading)

    if existing.kind == "absent":
        return writer.new(new_format)
    if existing.kind == "foreign":
        if overwrite and not append:
            loc.delete()
            return writer.new(new_format)
        fix = (
            "pass --overwrite without --append to replace it" if append else "pass --overwrite to replace it"
        )
        raise OutputExistsError(
            f"output {loc.url} already exists and is {existing.what}, not an ndvi-scale cube, so ndvi-scale "
            f"will not {'append to' if append else 'write into'} it; {fix}, or choose another --out"
        )
    state = existing.write
    fmt = existing.zarr_format
    if state.get("state") != "complete":
        same_run = state.get("fingerprint") == writer.fingerprint(fmt)
        replacing = overwrite and not append and int(state.get("n_before", 0)) > 0
        if same_run and not replacing:
            return writer.resume(existing)
        if overwrite and not append:
            loc.delete()
            return writer.new(new_format)
        raise OutputExistsError(
            f"output {loc.url} holds an unfinished write of another run ({_other_run(existing, ds)}); rerun "
            f"that exact command to finish it, run 'ndvi-scale repair {loc.url}' to roll it back to its last "
            "complete state (complete periods stay), or pass --overwrite without --append to replace the cube"
        )
    if overwrite and not append:
        loc.delete()
        return writer.new(new_format)
    if append:
        return writer.append(existing, recompute=overwrite)
    if _finish_pending(loc, existing) and state.get("fingerprint") == writer.fingerprint(fmt):
        return writer.finish_pending(existing)  # the same run, stopped after its cube was complete
    raise OutputExistsError(
        f"output {loc.url} already exists; pass --append to add new periods, --overwrite to replace it, or "
        "choose another --out"
    )


def check_output(
    out: str | Location,
    overwrite: bool = False,
    *,
    append: bool = False,
    storage_options: Mapping[str, Any] | None = None,
    zarr_format: int | None = None,
) -> Location:
    """Cheap pre-flight before any computation: resolve ``out``, probe access, refuse what write_cube would.

    Raises :class:`~ndvi_scale.errors.OutputExistsError` for an existing finished cube (without
    append/overwrite) or a non-cube path (without overwrite), :class:`~ndvi_scale.errors.GridMismatchError` for
    a cube of another ``zarr_format`` than asked. An unfinished cube passes: :func:`write_cube` decides to
    resume it.
    """
    loc = out if isinstance(out, Location) else open_location(str(out), storage_options)
    _refuse_bucket_root(loc)
    loc.check_access()
    WriterLease(loc).refuse_if_held()  # another run writing it now: refused before any search
    existing = _inspect(loc)
    _refuse_other_format(loc, existing, zarr_format, overwrite=overwrite, append=append)
    if existing.kind == "foreign" and not (overwrite and not append):
        raise OutputExistsError(
            f"output {loc.url} already exists and is {existing.what}, not an ndvi-scale cube; pass "
            "--overwrite to replace it, or choose another --out"
        )
    if (existing.kind == "cube" and existing.write.get("state") == "complete" and not (overwrite or append)
            and not _finish_pending(loc, existing)):  # else write_cube finishes it if it is the same run
        raise OutputExistsError(
            f"output {loc.url} already exists; pass --append to add new periods, --overwrite to replace it, "
            "or choose another --out"
        )
    return loc


def _refuse_other_format(
    loc: Location, existing: _Existing, zarr_format: int | None, *, overwrite: bool, append: bool
) -> None:
    """An existing cube is resumed and appended to in its own Zarr format: asking for another is refused (one
    line, nothing written) instead of being silently ignored; only a replacement may change it."""
    if existing.kind != "cube" or zarr_format is None or zarr_format == existing.zarr_format:
        return
    if overwrite and not append:
        return
    unfinished = existing.write.get("state") != "complete"
    doing = "finish its unfinished write" if unfinished else ("append to it" if append else "write into it")
    raise GridMismatchError(
        f"output {loc.url} is a Zarr v{existing.zarr_format} cube but --zarr-format {zarr_format} asks for "
        f"v{zarr_format}; a cube keeps its format: drop --zarr-format (or give {existing.zarr_format}) to "
        f"{doing}, or pass --overwrite without --append to rewrite it as v{zarr_format}"
    )


def write_zarr(
    ds: xr.Dataset,
    out: str | Location,
    *,
    overwrite: bool = False,
    append: bool = False,
    zarr_format: int | None = None,
    progress: ProgressCallback | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> WriteReport:
    """Backwards-compatible name of :func:`write_cube`."""
    return write_cube(
        ds,
        out,
        overwrite=overwrite,
        append=append,
        zarr_format=zarr_format,
        progress=progress,
        storage_options=storage_options,
    )


def prepare_dataset(ds: xr.Dataset) -> xr.Dataset:
    """Validate the composite and normalise it for writing (raises :class:`OutputError` naming the problem).

    Cube variables are the data variables with dims (time, y, x); they must be dask-backed (numpy ones are
    wrapped) with regular spatial chunks; time is rechunked to one period per chunk (one chunk = one region).
    """
    missing = [d for d in _CUBE_DIMS if d not in ds.dims]
    if missing:
        raise OutputError(f"dataset lacks dimension(s) {', '.join(missing)}; expected dims (time, y, x)")
    if "ndvi" not in ds.data_vars:
        raise OutputError(
            f"dataset has no 'ndvi' variable (has {', '.join(map(str, ds.data_vars))}); nothing to write"
        )
    for dim in _CUBE_DIMS:
        if dim not in ds.coords:
            raise OutputError(f"dataset has no '{dim}' coordinate; expected 1-D coordinates time, y and x")
    times = ds["time"].values
    if not np.issubdtype(times.dtype, np.datetime64):
        raise OutputError(f"time coordinate has dtype {times.dtype}; expected datetime64 (period start)")
    if times.size == 0:
        raise OutputError("dataset has no period (time is empty); nothing to write")
    if times.size > 1 and not bool(np.all(times[1:] > times[:-1])):
        raise OutputError(
            "time coordinate is not strictly increasing; sort periods and drop duplicates first"
        )
    for name, var in ds.data_vars.items():
        if set(var.dims) == set(_CUBE_DIMS) and var.dims != _CUBE_DIMS:
            ds = ds.assign({name: var.transpose(*_CUBE_DIMS)})
        elif set(var.dims) != set(_CUBE_DIMS) and isinstance(var.data, da.Array) and "time" in var.dims:
            raise OutputError(
                f"variable {name} has dims {var.dims}; data variables along time must have dims (time, y, x)"
            )
    if ds.rio.crs is None:
        raise OutputError(
            "dataset has no CRS (no spatial_ref / grid_mapping); expected the UTM CRS written with "
            "ds.rio.write_crs(...)"
        )
    cube_vars = _cube_vars(ds)
    ndvi = ds["ndvi"].data
    if isinstance(ndvi, da.Array):
        ychunks, xchunks = ndvi.chunks[1], ndvi.chunks[2]
        for dim, chunks in (("y", ychunks), ("x", xchunks)):
            if len(chunks) > 1 and (len(set(chunks[:-1])) != 1 or chunks[-1] > chunks[0]):
                raise OutputError(
                    f"ndvi chunks along {dim} are irregular ({', '.join(map(str, chunks[:6]))}...); rechunk "
                    f"to a fixed size first, e.g. ds.chunk({dim}=2048)"
                )
        target = {"time": 1, "y": ychunks[0], "x": xchunks[0]}
    else:
        from .config import DEFAULT_CHUNK

        target = {"time": 1, "y": min(DEFAULT_CHUNK, ds.sizes["y"]), "x": min(DEFAULT_CHUNK, ds.sizes["x"])}
    rechunk = {}
    for name in cube_vars:
        data = ds[name].data
        want = da.core.normalize_chunks((target["time"], target["y"], target["x"]), data.shape)
        if not isinstance(data, da.Array) or data.chunks != want:
            rechunk[name] = ds[name].chunk(target)
    if rechunk:
        ds = ds.assign(rechunk)
    return ds


def run_fingerprint(ds: xr.Dataset, zarr_format: int) -> str:
    """Stable hash of what determines the cube's bytes: config, items, grid, periods, variables, format.

    Flags that do not change the data (out, overwrite, append) are left out, so re-running an interrupted
    command with other flags still resumes; so is skip_bad_assets, so that a run stopped by an unreadable
    asset can be finished with ``--skip-bad-assets`` (what it skips is recorded in the cube).
    """
    cfg = _json_attr(get_attr(ds.attrs, "config"))
    if isinstance(cfg, dict):
        # codec: how chunks are compressed, not what they hold (each array keeps the codec it was created with)
        flags = ("out", "overwrite", "append", "zarr_format", "skip_bad_assets", "codec", "allow_local",
                 "allow_large")
        # URLs as stored (scrubbed): a rotated API key or signature is the same run
        cfg = scrub_value({k: v for k, v in cfg.items() if k not in flags})
    crs = ds.rio.crs
    payload = {
        "software": _software_version(),
        "config": cfg,
        "items": _json_attr(get_attr(ds.attrs, "items")),
        "crs": crs.to_wkt() if crs is not None else None,
        "x": hashlib.sha256(np.ascontiguousarray(ds["x"].values, dtype="<f8").tobytes()).hexdigest(),
        "y": hashlib.sha256(np.ascontiguousarray(ds["y"].values, dtype="<f8").tobytes()).hexdigest(),
        "time": _labels(ds["time"].values),
        "time_end": _labels(ds["time_end"].values) if "time_end" in ds.coords else None,
        "variables": {n: str(ds[n].dtype) for n in _cube_vars(ds)},
        "chunks": [int(ds["ndvi"].data.chunks[1][0]), int(ds["ndvi"].data.chunks[2][0])],
        "zarr_format": int(zarr_format),
    }
    aoi = aoi_digest(ds.attrs)
    if aoi is not None:  # only then: the fingerprints of cubes without an AOI stay what they were
        payload["aoi"] = aoi
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:32]


# ------------------------------------------------------------------------------------------------- writer lease

#: The lease object beside the cube (``<out>.lease.json``, like the STAC item): outside the store, so it never
#: changes what the store holds, how it is classified, or what ``--overwrite`` deletes.
LEASE_SUFFIX = ".lease.json"
#: Seconds a lease stays valid without a heartbeat (``NDVI_SCALE_LEASE_TTL``); renewed every quarter of it.
LEASE_TTL = 120.0


#: Seconds a lease created on a store that ignores conditional creates settles before it is trusted (two
#: writers that both read "no lease" create theirs one round trip after that read, well within it).
LEASE_SETTLE = 2.0


def _refused_create(exc: BaseException) -> bool:
    """True if ``exc`` is an object store refusing a conditional create (the object exists)."""
    text = str(exc).lower()
    return any(k in text for k in ("precondition", "pre-condition", "412", "conditionnotmet"))


def _lease_ttl() -> float:
    raw = os.environ.get("NDVI_SCALE_LEASE_TTL", "").strip()
    try:
        return max(2.0, float(raw)) if raw else LEASE_TTL
    except ValueError:
        return LEASE_TTL


def _iso_time(t: float) -> str:
    import datetime as dt

    return dt.datetime.fromtimestamp(t, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class WriterLease:
    """One writer at a time per output: an object ``<out>.lease.json`` holding owner, host, pid, heartbeat and
    expiry, created exclusively (local: ``O_CREAT|O_EXCL``; S3: conditional put ``If-None-Match: *``; GCS:
    ``ifGenerationMatch=0``) and renewed by a heartbeat thread while the write runs.

    A second writer is refused with one line naming the holder and when its lease expires. A stale lease (expired,
    or held by a dead process on this host) is taken over. Limits, documented: an S3-compatible server that
    ignores ``If-None-Match`` makes the create last-writer-wins (the lease is read back to catch a lost race,
    not to prevent it), and taking over a stale lease is a delete then an exclusive create, so two writers
    taking over the same stale lease in the same instant may both proceed on object stores.
    """

    def __init__(self, loc: Location, ttl: float | None = None) -> None:
        import socket
        import uuid

        self.loc = loc
        self.target = loc.sibling(LEASE_SUFFIX)
        self.ttl = ttl if ttl is not None else _lease_ttl()
        self.token = uuid.uuid4().hex
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self._stop: Any = None
        self._thread: Any = None
        #: False once the store was seen to ignore the exclusive create (then acquire settles and verifies).
        self.atomic = True

    # ------------------------------------------------------------------ the object
    def _doc(self, started: float | None = None) -> bytes:
        import getpass
        import time

        now = time.time()
        try:
            owner = getpass.getuser()
        except Exception:
            owner = "unknown"
        return json.dumps({
            "owner": owner, "host": self.host, "pid": self.pid, "token": self.token,
            "started": _iso_time(started or now), "heartbeat": _iso_time(now), "expires": now + self.ttl,
            "expires_at": _iso_time(now + self.ttl), "ttl": self.ttl, "software": _software_version(),
        }).encode()

    def read(self) -> dict[str, Any] | None:
        """The lease held now, or None."""
        try:
            doc = json.loads(self.target.fs.cat_file(self.target.path))
        except FileNotFoundError:
            return None
        except ValueError:
            return {"owner": "?", "host": "?", "pid": -1, "expires": 0.0, "token": ""}  # damaged: stale
        except Exception as exc:
            raise storage_error(exc, self.target, "reading the writer lease of") from None
        return doc if isinstance(doc, dict) else None

    def _create(self, data: bytes) -> bool:
        """Exclusive create; False if a lease exists."""
        t = self.target
        try:
            if t.is_local:
                os.makedirs(os.path.dirname(t.path) or ".", exist_ok=True)
                fd = os.open(t.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                with os.fdopen(fd, "wb") as fh:
                    fh.write(data)
                return True
            t.fs.pipe_file(t.path, data, mode="create")
        except FileExistsError:
            return False
        except Exception as exc:
            if _refused_create(exc):
                return False
            raise storage_error(exc, t, "creating the writer lease of") from None
        held = self.read()  # a server that ignored the condition: whoever wrote last holds it
        if held is None or held.get("token") != self.token:
            return False
        # Does this server honour the exclusive create? Create the same object again: it must be refused.
        try:
            t.fs.pipe_file(t.path, data, mode="create")
            self.atomic = False
        except Exception as exc:
            if not (isinstance(exc, FileExistsError) or _refused_create(exc)):
                raise storage_error(exc, t, "creating the writer lease of") from None
        return True

    @staticmethod
    def stale(held: Mapping[str, Any], now: float | None = None) -> bool:
        import socket
        import time

        now = time.time() if now is None else now
        try:
            if float(held.get("expires", 0)) < now:
                return True
        except (TypeError, ValueError):
            return True
        if held.get("host") == socket.gethostname():
            try:
                pid = int(held.get("pid", -1))
                if pid <= 0:
                    return True
                os.kill(pid, 0)
            except ProcessLookupError:
                return True
            except (PermissionError, TypeError, ValueError, OverflowError):
                return False
        return False

    def describe(self, held: Mapping[str, Any]) -> str:
        return (f"{shown_text(held.get('owner'))}@{shown_text(held.get('host'))} pid {shown_text(held.get('pid'))} "
                f"(since {shown_text(held.get('started'))}, last heartbeat {shown_text(held.get('heartbeat'))}, "
                f"lease expires {shown_text(held.get('expires_at'))})")

    def refuse_if_held(self) -> None:
        """The pre-flight: refuse now if another live writer holds the lease (nothing is taken). A stale one
        (a killed run's) is removed, so that it is not left behind when the run then writes nothing."""
        held = self.read()
        if held is None or held.get("token") == self.token:
            return
        if not self.stale(held):
            raise self._refusal(held)
        log.info("removing the stale writer lease of %s held by %s", self.loc.url, self.describe(held))
        self._remove()

    def verify(self) -> None:
        """Refuse (as a second writer) if the lease object no longer holds this lease's token.

        The fence against two creates that both seemed to succeed: on a server that does not make the
        exclusive create atomic (seen with the GCS emulator: two appends started together both held the lease
        and one crashed with "'2024-03-01' is not in list"), the last writer's token is what stays, so the
        other one, reading it again before its first write, is refused instead of writing beside it.
        """
        held = self.read()
        if held is None or held.get("token") != self.token:
            raise self._refusal(held or {})

    def _refusal(self, held: Mapping[str, Any]) -> OutputError:
        return OutputError(
            f"output {self.loc.url} is being written by {self.describe(held)}; wait for that run to end and "
            "re-run, or if it is dead elsewhere, re-run after its lease expires"
        )

    # ------------------------------------------------------------------ acquire / heartbeat / release
    def acquire(self) -> WriterLease:
        import time

        started = time.time()
        for _ in range(3):
            # Read first: a live lease is refused without writing anything (on a store that would ignore the
            # create condition, only a truly simultaneous start could then slip through).
            held = self.read()
            if held is not None:
                if not self.stale(held):
                    raise self._refusal(held)
                log.warning("taking over the stale writer lease of %s held by %s", self.loc.url,
                            self.describe(held))
                self._remove()
            if self._create(self._doc(started)):
                if not self.atomic:
                    log.warning("%s ignores conditional creates: the writer lease is best effort there",
                                self.target.url)
                    # Last writer wins there: a rival that read "no lease" just before our create writes its own
                    # within moments; wait that long, then check the lease is still ours (else: refused).
                    time.sleep(LEASE_SETTLE)
                    self.verify()
                self._start_heartbeat(started)
                return self
        raise self._refusal(self.read() or {})

    def _remove(self) -> None:
        try:
            self.target.fs.rm_file(self.target.path)
        except FileNotFoundError:
            pass
        except Exception as exc:
            raise storage_error(exc, self.target, "removing the writer lease of") from None

    def _start_heartbeat(self, started: float) -> None:
        import threading

        stop = threading.Event()

        def beat() -> None:
            while not stop.wait(self.ttl / 4):
                try:
                    held = self.read()
                    if held is None or held.get("token") != self.token:
                        log.error("the writer lease of %s was taken by %s", self.loc.url,
                                  self.describe(held or {}))
                        return
                    self.target.fs.pipe_file(self.target.path, self._doc(started))
                except Exception as exc:  # a transient storage error: the next beat tries again
                    log.warning("could not renew the writer lease of %s: %s", self.loc.url, exc)

        self._stop = stop
        self._thread = threading.Thread(target=beat, name="ndvi-scale-lease", daemon=True)
        self._thread.start()

    def release(self) -> None:
        if self._stop is not None:
            self._stop.set()
            self._thread.join(timeout=5)
            self._stop = None
        try:
            held = self.read()
        except NdviScaleError:
            return
        if held is not None and held.get("token") == self.token:
            try:
                self._remove()
            except NdviScaleError as exc:
                log.warning("could not remove the writer lease of %s: %s", self.loc.url, exc)

    def __enter__(self) -> WriterLease:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def shown_text(value: Any) -> str:
    from .errors import cut

    return cut(str(value), 40)


# ------------------------------------------------------------------------------------------------- inspection


@dataclass(frozen=True)
class _Existing:
    kind: str
    """``absent`` (nothing, or an empty folder), ``foreign`` (something else) or ``cube``."""
    what: str = ""
    zarr_format: int = 3
    attrs: Mapping[str, Any] = field(default_factory=dict)
    write: Mapping[str, Any] = field(default_factory=dict)


def _inspect(loc: Location) -> _Existing:
    """Classify what is at ``loc`` from the root metadata objects only (no listing of the whole store)."""
    if loc.is_local:
        if not os.path.lexists(loc.path):
            return _Existing("absent")
        if not os.path.isdir(loc.path):
            return _Existing("foreign", "a file")
        if loc.is_empty_dir():
            return _Existing("absent")
    elif not loc.exists():
        return _Existing("absent")
    meta = loc.read_bytes("zarr.json")
    fmt = 3
    attrs: dict[str, Any] | None = None
    if meta is not None:
        try:
            doc = json.loads(meta)
        except ValueError:
            return _Existing("foreign", "an unreadable Zarr store")
        if doc.get("node_type") != "group":
            return _Existing("foreign", "a Zarr array")
        attrs = dict(doc.get("attributes") or {})
    elif loc.read_bytes(".zgroup") is not None:
        fmt = 2
        raw = loc.read_bytes(".zattrs")
        try:
            attrs = json.loads(raw) if raw else {}
        except ValueError:
            return _Existing("foreign", "an unreadable Zarr store")
    if attrs is None:
        if loc.is_local:
            if _only_partial_files(loc.path):  # a new cube killed while its first metadata file was written
                return _Existing("absent")
            return _Existing("foreign", "a non-empty folder")
        try:
            is_file = bool(loc.fs.isfile(loc.path))
        except Exception as exc:
            raise storage_error(exc, loc, "checking") from None
        return _Existing("foreign", "an object" if is_file else "a prefix holding other objects")
    attrs = _renamed(attrs)
    if CUBE_ATTR not in attrs:
        return _Existing("foreign", "a Zarr store")
    write = _json_attr(attrs.get(WRITE_ATTR))
    if not isinstance(write, dict):
        return _Existing("foreign", "a damaged ndvi-scale cube (no write state)")
    return _Existing("cube", "an ndvi-scale cube", fmt, attrs, write)


def _other_run(existing: _Existing, ds: xr.Dataset) -> str:
    """How the run that left ``existing`` unfinished differs from this one (``ds``): the settings that differ,
    old -> new (``method 'median' -> 'max'``), else that the scenes or the grid differ; then its periods."""
    from .cf import attr_name
    from .hints import config_changes, describe_changes

    periods = list(existing.write.get("periods", []))
    span = (f"periods {periods[0]}" if len(periods) == 1 else
            f"{len(periods)} periods {periods[0]}..{periods[-1]}" if periods else "periods ?")
    old, new = (_json_attr((a or {}).get(attr_name("config"))) for a in (existing.attrs, ds.attrs))
    changes = config_changes(old if isinstance(old, dict) else None, new if isinstance(new, dict) else None)
    if changes:
        return f"its settings differ, then -> now: {describe_changes(changes)}; {span}"
    return f"same settings, but other scenes or another grid: the catalog changed meanwhile; {span}"


def _finish_pending(loc: Location, existing: _Existing) -> bool:
    """True if the complete cube ``existing`` lacks what the end of a write adds after marking it complete:
    markers removed, metadata consolidated, STAC item written (a run killed in between leaves such a cube)."""
    if existing.kind != "cube" or existing.write.get("state") != "complete":
        return False
    try:
        if loc.is_local:
            if os.path.exists(loc.join(MARKER_PREFIX)) or _partial_files(loc.path):
                return True
        else:
            below = loc.join(MARKER_PREFIX).rstrip("/") + "/"
            # objects below it only: some S3 servers (SeaweedFS) still list the emptied "folder" itself
            if any(p.startswith(below) for p in loc.fs.find(loc.join(MARKER_PREFIX))):
                return True
        if existing.zarr_format == 2:
            if loc.read_bytes(".zmetadata") is None:
                return True
        else:
            doc = json.loads(loc.read_bytes("zarr.json") or b"{}")
            if not doc.get("consolidated_metadata"):
                return True
        item = loc.sibling(STAC_SUFFIX)
        try:
            props = json.loads(item.fs.cat_file(item.path)).get("properties") or {}
        except (FileNotFoundError, ValueError, AttributeError):
            return True  # no item, or not one we can read
        # an append killed before its item was written leaves the item of the cube before it
        return bool(props.get("ndvi_scale:fingerprint") != existing.write.get("fingerprint"))
    except NdviScaleError:
        raise
    except Exception as exc:
        raise storage_error(exc, loc, "checking") from None


# ------------------------------------------------------------------------------------------------- the writer


class _Writer:
    """One write_cube call: phases shared by new, resumed and appended writes."""

    def __init__(
        self,
        loc: Location,
        ds: xr.Dataset,
        progress: ProgressCallback | None,
        fingerprint: str | None,
        faults: FaultLog | None = None,
        asset_labels: Mapping[str, tuple[str, str]] | None = None,
        codec: str = DEFAULT_CODEC,
        start_reading: Callable[[], Any] | None = None,
    ) -> None:
        self.loc = loc
        self.codec = codec
        self.faults = faults
        self.asset_labels = dict(asset_labels or {})
        self.skipped: list[dict[str, Any]] = []
        self.waves = 0
        self.start_reading = start_reading
        self.ds = ds
        self.progress = progress
        self._fingerprint = fingerprint
        self.cube_vars = _cube_vars(ds)
        self.labels = _labels(ds["time"].values)
        chunks = ds["ndvi"].data.chunks
        self.nblocks = (len(chunks[1]), len(chunks[2]))

    def fingerprint(self, fmt: int) -> str:
        return self._fingerprint or run_fingerprint(self.ds, fmt)

    @property
    def regions_per_period(self) -> int:
        return self.nblocks[0] * self.nblocks[1]

    # ---------------------------------------------------------------- entry points

    def new(self, fmt: int) -> WriteReport:
        fp = self.fingerprint(fmt)
        state = {"fingerprint": fp, "state": "template", "periods": self.labels, "n_before": 0}
        if self.start_reading is None or not _in_process_scheduler():
            if self.start_reading is not None and _active_client() is None:
                self.start_reading()
            self._write_metadata(fmt, state)
            return self._regions_and_finish(fmt, state, resumed=False, skipped_periods=())
        # The metadata is written while the first regions compute (~0.2-0.4 s of one core on object storage or a
        # busy machine, where the regions' reads would otherwise wait): each region writes its chunks only once
        # the metadata is complete (_MetadataGate), so the store goes through the same states. The template
        # replaces what is at the location: faults recorded before it would be lost, so the log holds them.
        if self.faults is not None:
            self.faults.hold()
        try:
            self.start_reading()
            gate = _MetadataGate(lambda: self._write_metadata(fmt, state, release=self.faults))
            with gate.running():
                return self._regions_and_finish(fmt, state, resumed=False, skipped_periods=(), gate=gate)
        finally:
            if self.faults is not None:
                self.faults.release()  # held ones were released with the template, unless it never ran

    def _write_metadata(
        self, fmt: int, state: Mapping[str, Any], release: FaultLog | None = None
    ) -> dict[str, dict[str, Any]]:
        """A new cube's metadata (template, state "regions", consolidated); returns the stored encodings of the
        cube variables. ``release``: a held fault log, released once the template is written (whatever
        happens). Raises :class:`~ndvi_scale.errors.StorageError` / :class:`OutputError`."""
        try:
            self._write_template(fmt, state)
        finally:
            if release is not None:
                release.release()
        self._set_state(fmt, {**state, "state": "regions"})
        consolidate(self.loc, fmt)  # an unfinished cube opens with plain xr.open_zarr (its regions read as fill)
        labels, encodings = self._store_layout(fmt)
        if labels != self.labels:  # the template was written from these very labels
            raise OutputError(f"output {self.loc.url} was written with periods {labels}, not {self.labels}")
        return encodings

    def resume(self, existing: _Existing) -> WriteReport:
        fmt = existing.zarr_format
        state = dict(existing.write)
        periods = list(state.get("periods", []))
        unknown = [p for p in periods if p not in self.labels]
        if unknown:  # cannot happen with equal fingerprints unless the attribute was edited by hand
            raise OutputError(
                f"output {self.loc.url} has unfinished periods {', '.join(unknown)} that this run does not "
                "compute; rerun the command that started it, or pass --overwrite to replace the cube"
            )
        log.info("resuming the unfinished write of %s (periods %s)", self.loc.url, ", ".join(periods))
        self._declare_state_group(fmt)  # a cube interrupted by an older version has a bare folder there
        _remove_partial_files(self.loc)  # temporary files of chunk writes the killed run left behind
        if state.get("state") == "template":
            if int(state.get("n_before", 0)) == 0:
                # Interrupted while writing metadata of a new cube: no data yet, start that cube again.
                self.loc.delete()
                return self.new(fmt)
            self._extend(fmt, state)
            self._set_state(fmt, {**state, "state": "regions"})
            consolidate(self.loc, fmt)
        skipped = tuple(p for p in self.labels if p not in periods)
        return self._regions_and_finish(fmt, state, resumed=True, skipped_periods=skipped)

    def append(self, existing: _Existing, *, recompute: bool) -> WriteReport:
        fmt = existing.zarr_format
        _remove_partial_files(self.loc)  # e.g. of a run killed while it consolidated the metadata
        store = self._store()
        try:
            cube = xr.open_zarr(store, consolidated=False, decode_coords="all", zarr_format=_zf(fmt))
        except NdviScaleError:
            raise
        except Exception as exc:
            raise _as_error(exc, self.loc, "reading") from None
        self._check_grid(cube)
        old = _labels(cube["time"].values)
        present = [p for p in self.labels if p in old]
        new = [p for p in self.labels if p not in old]
        if new and old and new[0] < old[-1]:
            raise OutputError(
                f"period {new[0]} is earlier than the last period {old[-1]} of {self.loc.url} and not in it; "
                "periods must stay sorted in time: write it to another --out, or rebuild the cube with "
                "--overwrite"
            )
        self._check_period_ends(cube, present)
        todo = sorted(set(new) | (set(present) if recompute else set()))
        skipped = tuple(p for p in self.labels if p not in todo)
        fp = self.fingerprint(fmt)
        if not todo:
            if _finish_pending(self.loc, existing):
                return self.finish_pending(existing)
            log.info("all periods of this run are already in %s: nothing to write", self.loc.url)
            total = len(self.labels) * self.regions_per_period
            if self.progress:
                self.progress(0, 0)
            return WriteReport(
                self.loc.url, None, fmt, total, 0, total, (), skipped, resumed=False, fingerprint=fp
            )
        state = {"fingerprint": fp, "state": "template", "periods": todo, "n_before": len(old)}
        self._set_state(fmt, state)
        if fmt == 2:
            # A stale .zmetadata would show readers the old shapes; without it they list (slower, but right).
            self._rm(".zmetadata")
        self._extend(fmt, state)
        self._set_state(fmt, {**state, "state": "regions"})
        consolidate(self.loc, fmt)  # the grown arrays, for readers of the unfinished cube (plain xr.open_zarr)
        return self._regions_and_finish(fmt, state, resumed=False, skipped_periods=skipped)

    # ---------------------------------------------------------------- phases

    def _write_template(self, fmt: int, state: Mapping[str, Any]) -> None:
        tmpl = _template(self.ds)
        tmpl.attrs = {**tmpl.attrs, CUBE_ATTR: _CUBE_LAYOUT, WRITE_ATTR: _dumps(state), RUNS_ATTR: _dumps([])}
        if fmt == 2 and tmpl.rio.crs is not None:
            # GDAL's own CRS attribute: GDAL < 3.7 (Debian 12's 3.6) ignores CF grid_mapping in Zarr. Zarr v2 only:
            # GDAL reads the v3 arrays of zarr-python 3 from 3.11 on, and those GDALs read grid_mapping.
            crs_attr = gdal_crs_attr(tmpl.rio.crs)
            for name in self.cube_vars:
                tmpl[name].attrs["_CRS"] = crs_attr
        encoding = _encoding(tmpl, self.cube_vars, fmt, self.codec)
        try:
            with warnings.catch_warnings():
                # xarray/zarr notes on v3 and chunk encodings
                warnings.simplefilter("ignore", category=UserWarning)
                # Mode "w", not "w-": the location was checked to hold no object (or just emptied by
                # --overwrite), yet some S3 servers still list the deleted "folders", which "w-" would take
                # for existing data.
                tmpl.to_zarr(
                    self._store(),
                    mode="w",
                    compute=False,
                    consolidated=False,
                    zarr_format=_zf(fmt),
                    encoding=encoding,
                )
        except NdviScaleError:
            raise
        except Exception as exc:
            raise _as_error(exc, self.loc, "writing") from None

    def _extend(self, fmt: int, state: Mapping[str, Any]) -> None:
        """Grow the time axis for the new periods of an append.

        Idempotent, so a resumed append redoes it safely: every time array is resized to the absolute target
        length, then the new time coordinates are (re)written.
        """
        import zarr

        n_before = int(state["n_before"])
        new = [p for p in state["periods"] if p in self.labels]
        sub = self.ds.isel(time=[self.labels.index(p) for p in new])
        try:
            group = zarr.open_group(self._store(), mode="r+", zarr_format=_zf(fmt), use_consolidated=False)
            old_labels = _labels(
                xr.open_zarr(self._store(), consolidated=False, zarr_format=_zf(fmt))["time"].values[
                    :n_before
                ]
            )
            added = [p for p in new if p not in old_labels]  # empty for a recompute-only run
            total = n_before + len(added)
            add = sub.isel(time=[new.index(p) for p in added])
            for _, arr in group.arrays() if added else ():
                dims = _array_dims(arr)
                if dims and dims[0] == "time" and arr.shape[0] != total:
                    arr.resize((total, *arr.shape[1:]))
            # The new coordinate values are encoded exactly like the stored ones (same units/dtype) and
            # written with zarr directly: xarray's region writes skip index coordinates such as `time`.
            stored = xr.open_zarr(self._store(), consolidated=False, zarr_format=_zf(fmt))
            for key, coord in add.coords.items():
                name = str(key)
                if not added or coord.dims[:1] != ("time",) or name not in group:
                    continue
                var = coord.variable.copy()
                var.encoding = {
                    k: v for k, v in stored[name].encoding.items() if k in ("units", "calendar", "dtype")
                }
                encoded = xr.conventions.encode_cf_variable(var, name=name)
                target = cast(zarr.Array, group[name])
                target[n_before:total] = np.asarray(encoded.values)
        except NdviScaleError:
            raise
        except Exception as exc:
            raise _as_error(exc, self.loc, "extending") from None
        # Markers of the periods about to be (re)written must not survive from any earlier attempt.
        for period in state["periods"]:
            self._rm(f"{MARKER_DIR}/{_marker_name(period)}")

    def _regions_and_finish(
        self,
        fmt: int,
        state: Mapping[str, Any],
        *,
        resumed: bool,
        skipped_periods: Sequence[str],
        gate: _MetadataGate | None = None,
    ) -> WriteReport:
        """Compute and write the regions not done yet, then finish. ``gate``: the metadata of this new cube is
        still being written; the regions get the stored encodings from it, and there are no markers yet."""
        periods = list(state["periods"])
        if gate is None:
            store_labels, encodings = self._store_layout(fmt)
            done = self._done_markers()
        else:
            store_labels, encodings, done = list(self.labels), None, set()
        sub = self.ds.isel(time=_as_slice([self.labels.index(p) for p in periods]))
        time_index = tuple(store_labels.index(p) for p in periods)
        groups = self._region_tasks(sub, fmt, periods, time_index, encodings, done, gate)
        n_tasks = sum(len(g) for g in groups)
        per = self.regions_per_period
        already = len(periods) * per - n_tasks
        log.info(
            "writing %d region(s) of %s (%d already written, %d period(s) skipped)",
            n_tasks,
            self.loc.url,
            already,
            len(skipped_periods),
        )
        if self.faults is not None and gate is None:  # a new cube (gate) has no failures of an earlier run
            self.faults.clear_failed()
        try:
            self._compute(groups)
            if gate is not None:
                gate.wait()  # the metadata, before the cube is finished (no region waited if none ran)
        except Exception as exc:
            if gate is not None:
                gate.raise_failure()  # the regions stopped on it: its own error, not theirs
            if self.faults is None:
                raise
            err = self._read_failure(exc)
            if err is exc:
                raise
            raise err from None
        if self.faults is not None:
            self.skipped = summarise(self.faults.read(skipped=True), self.asset_labels)
        fp = str(state["fingerprint"])
        self._finish(fmt, state)
        item_url = self._write_stac(fmt, fp)
        total = len(self.labels) * per
        return WriteReport(
            url=self.loc.url,
            stac_item_url=item_url,
            zarr_format=_zf(fmt),
            regions_total=total,
            regions_written=n_tasks,
            regions_skipped=total - n_tasks,
            periods_written=tuple(periods),
            periods_skipped=tuple(skipped_periods),
            resumed=resumed,
            fingerprint=fp,
            skipped_assets=tuple(self.skipped),
            waves=self.waves,
        )

    def _read_failure(self, exc: Exception) -> Exception:
        """``exc`` as a :class:`ReadError` listing every asset that failed, if reads failed; else ``exc``."""
        assert self.faults is not None
        try:
            failed = summarise(self.faults.read(skipped=False), self.asset_labels)
        except Exception:
            failed = []
        hit = next((e for e in exception_chain(exc) if isinstance(e, AssetReadError)), None)
        if not failed:
            if hit is None:
                return exc
            failed = summarise([hit.fault], self.asset_labels)
        try:
            kept = len(self._done_markers())
        except Exception:
            kept = 0
        lines = "; ".join(describe_summary(e) for e in failed)
        return ReadError(
            f"{len(failed)} asset(s) could not be read after retries: {lines}. {kept} finished region(s) of "
            f"{self.loc.url} are kept: re-run the same command to resume once the assets are readable, or add "
            "--skip-bad-assets to compose without them (they are then recorded in the cube's "
            "ndvi_scale_skipped_assets and its STAC item)"
        )

    def _region_tasks(
        self,
        sub: xr.Dataset,
        fmt: int,
        periods: Sequence[str],
        time_index: Sequence[int],
        encodings: Mapping[str, Mapping[str, Any]] | None,
        done: set[str],
        gate: _MetadataGate | None = None,
    ) -> list[list[Any]]:
        arrays = [sub[n].data for n in self.cube_vars]
        nt = len(periods)
        nby, nbx = self.nblocks
        token = dask.base.tokenize(*arrays, self.loc.url, tuple(periods), time_index)
        out = da.map_blocks(
            _write_region,
            *arrays,
            names=tuple(self.cube_vars),
            encodings=encodings,
            gate=gate.key if gate is not None else None,
            spec=self.loc.spec(),
            zarr_format=_zf(fmt),
            time_index=tuple(time_index),
            markers=tuple(_marker_name(p) for p in periods),
            dtype=bool,
            chunks=((1,) * nt, (1,) * nby, (1,) * nbx),
            meta=np.empty((0, 0, 0), dtype=bool),
            name=f"ndvi-scale-write-{token}",
        )
        # One optimisation of the whole graph (all variables together, so shared inputs are computed once),
        # then keep only the regions without a marker: dask culls everything else. One group per period.
        delayed = out.to_delayed(optimize_graph=True)
        groups = []
        for t, period in enumerate(periods):
            group = [delayed[t, j, k] for j in range(nby) for k in range(nbx)
                     if f"{_marker_name(period)}/{j}-{k}" not in done]
            if group:
                groups.append(group)
        return groups

    def _compute(self, groups: list[list[Any]]) -> None:
        """Compute the region tasks, one period after the other, in waves (:mod:`ndvi_scale.waves`).

        Period by period, because neighbouring chunks of one period share COG tiles (the reader's tile cache,
        ndvi_scale.reader) and the items' open files: left to itself dask interleaves periods, and the cache
        then re-reads ~1/3 of the partly-needed tiles (benchmarks: 1.15x the bytes instead of 1.01x). A period
        of more regions than a wave is cut into waves; on a cluster at most two waves are on the scheduler, the
        earlier with higher priority (no barrier between them).
        """
        from .waves import compute_in_waves, split_waves, wave_regions

        tasks = [t for g in groups for t in g]
        total = len(tasks)
        if self.progress:
            self.progress(0, total)
        if not tasks:
            return
        waves = split_waves(groups, wave_regions())
        client = _active_client()
        try:
            if client is not None:
                from .cluster import DEFAULT_RETRIES

                # A worker lost mid-run (preemption, OOM kill) must not fail the job: its regions are retried.
                on_done = (lambda n: self.progress(n, total)) if self.progress else None  # type: ignore[misc]
                self.waves = compute_in_waves(waves, client, retries=DEFAULT_RETRIES, on_done=on_done)
            elif self.progress:
                with _ProgressCallback({t.key for t in tasks}, total, self.progress):
                    self.waves = compute_in_waves(waves, None)
            else:
                self.waves = compute_in_waves(waves, None)
        except NdviScaleError:
            raise
        except Exception as exc:
            if _is_storage_failure(exc):
                raise storage_error(exc, self.loc, "writing") from exc
            raise

    def _finish(self, fmt: int, state: Mapping[str, Any]) -> None:
        """Mark complete, drop the markers, consolidate metadata.

        In this order: a crash after the first step leaves a complete cube (with leftover markers, removed by
        the next append) and never a cube whose finished regions would be forgotten.
        """
        import zarr

        store = self._store()
        try:
            group = zarr.open_group(store, mode="r+", zarr_format=_zf(fmt), use_consolidated=False)
            attrs = _renamed(group.attrs)  # an older cube's ndvi_scale:* attributes get their CF-legal names
            runs = _json_attr(attrs.get(RUNS_ATTR))
            runs = runs if isinstance(runs, list) else []
            entry = {
                "fingerprint": state["fingerprint"],
                "periods": list(state["periods"]),
                "software": {"ndvi-scale": _software_version()},
            }
            if entry not in runs:
                runs.append(entry)
            update = {**_cf_attrs(self.ds.attrs), WRITE_ATTR: _dumps({**state, "state": "complete"})}
            update[RUNS_ATTR] = _dumps(runs)
            before = _json_attr(attrs.get(SKIPPED_ATTR))
            before = before if isinstance(before, list) else []
            if self.skipped or before:
                update[SKIPPED_ATTR] = _dumps(scrub_value(merge_summaries(before, self.skipped)))
            update[CUBE_ATTR] = _CUBE_LAYOUT
            history = merge_history(self.ds.attrs.get("history"), attrs.get("history"))
            if history:
                update["history"] = history  # CF: one line per run that wrote into the cube, newest first
            if any(str(k).startswith(LEGACY_PREFIX) for k in group.attrs):
                group.attrs.put({**attrs, **update})
            else:
                group.attrs.update(update)
            if fmt == 2 and self.ds.rio.crs is not None:  # a v2 cube written before GDAL's _CRS gets it too
                crs_attr = gdal_crs_attr(self.ds.rio.crs)
                for name in self.cube_vars:
                    array = group[name]
                    if "_CRS" not in array.attrs:
                        array.attrs["_CRS"] = crs_attr
        except NdviScaleError:
            raise
        except Exception as exc:
            raise _as_error(exc, self.loc, "finishing") from None
        self._rm(MARKER_PREFIX)
        self._consolidate(fmt)

    def _consolidate(self, fmt: int) -> None:
        """The last consolidation of a write (the one :func:`_finish_pending` checks for)."""
        consolidate(self.loc, fmt)

    def finish_pending(self, existing: _Existing) -> WriteReport:
        """Redo the last steps of a write whose cube is complete but that was stopped before they ended
        (markers left, metadata not consolidated, no STAC item: :func:`_finish_pending`). Idempotent."""
        fmt = existing.zarr_format
        fp = str(existing.write.get("fingerprint", ""))
        log.info("finishing the complete cube %s (markers, consolidated metadata, STAC item)", self.loc.url)
        _remove_partial_files(self.loc)
        self._rm(MARKER_PREFIX)
        self._consolidate(fmt)
        item_url = self._write_stac(fmt, fp)
        total = len(self.labels) * self.regions_per_period
        if self.progress:
            self.progress(0, 0)
        return WriteReport(self.loc.url, item_url, _zf(fmt), total, 0, total, (), tuple(self.labels),
                           resumed=True, fingerprint=fp)

    # ---------------------------------------------------------------- checks

    def _check_grid(self, cube: xr.Dataset) -> None:
        ds = self.ds
        diffs: list[str] = []
        crs_a, crs_b = cube.rio.crs, ds.rio.crs
        if (crs_a is None) != (crs_b is None) or (crs_a is not None and crs_a != crs_b):
            diffs.append(f"CRS: cube {_crs_name(crs_a)}, this run {_crs_name(crs_b)}")
        for dim in ("x", "y"):
            a, b = cube[dim].values, ds[dim].values
            if a.shape == b.shape and np.array_equal(a, b):
                continue
            ra, rb = _resolution(a), _resolution(b)
            if not math.isclose(ra, rb, rel_tol=1e-9):
                diffs.append(f"resolution along {dim}: cube {ra:g}, this run {rb:g}")
            else:
                diffs.append(
                    f"{dim} coordinates: cube {a.size} values from {a[0]:.2f} to {a[-1]:.2f}, this run "
                    f"{b.size} from {b[0]:.2f} to {b[-1]:.2f} (another bbox or origin)"
                )
        cube_vars = {str(n): str(v.dtype) for n, v in cube.data_vars.items() if v.dims == _CUBE_DIMS}
        run_vars = {n: str(ds[n].dtype) for n in self.cube_vars}
        if cube_vars != run_vars:
            diffs.append(f"variables: cube {_fmt_vars(cube_vars)}, this run {_fmt_vars(run_vars)}")
        chunks_a = tuple(cube["ndvi"].encoding.get("chunks") or ())[1:]
        chunks_b = (ds["ndvi"].data.chunks[1][0], ds["ndvi"].data.chunks[2][0])
        if chunks_a and tuple(chunks_a) != chunks_b:
            diffs.append(
                f"chunking: cube {chunks_a[0]}x{chunks_a[1]} px, this run {chunks_b[0]}x{chunks_b[1]} px"
            )
        aoi_diff = _aoi_difference(cube.attrs, ds.attrs)
        if aoi_diff:
            diffs.append(aoi_diff)
        if diffs:
            raise GridMismatchError(
                f"cannot append to {self.loc.url}: its grid differs from this run's - {'; '.join(diffs)}. "
                "Use the cube's --crs/--resolution/--bbox/--chunk (and method), or write to another --out"
            )

    def _check_period_ends(self, cube: xr.Dataset, present: Sequence[str]) -> None:
        if "time_end" not in cube.coords or "time_end" not in self.ds.coords or not present:
            return
        old = dict(zip(_labels(cube["time"].values), _labels(cube["time_end"].values), strict=True))
        new = dict(zip(self.labels, _labels(self.ds["time_end"].values), strict=True))
        for p in present:
            if old[p] != new[p]:
                raise GridMismatchError(
                    f"cannot append to {self.loc.url}: period {p} ends {old[p]} in the cube but {new[p]} in "
                    "this run (another --period?); use the cube's period, or write to another --out"
                )

    # ---------------------------------------------------------------- helpers

    def _store(self) -> Any:
        return store_from_spec(self.loc.spec())

    def _set_state(self, fmt: int, state: Mapping[str, Any]) -> None:
        import zarr

        try:
            group = zarr.open_group(self._store(), mode="r+", zarr_format=_zf(fmt), use_consolidated=False)
            group.attrs.update({WRITE_ATTR: _dumps(state)})
        except Exception as exc:
            raise _as_error(exc, self.loc, "writing") from None
        if state.get("state") != "complete":
            self._declare_state_group(fmt)

    def _declare_state_group(self, fmt: int) -> None:
        """Make the run-state folder (:data:`MARKER_PREFIX`: progress markers, fault records) an empty Zarr group,
        so that zarr and xarray opening an unfinished cube see a known node instead of warning
        ``Object at .ndvi-scale is not recognized as a component of a Zarr hierarchy``. Same place as before,
        so cubes interrupted by an older version resume as they are (they get the group doc on resume)."""
        try:
            self.loc.fs.pipe_file(self.loc.join(*_STATE_GROUP_DOC[fmt][0]), _STATE_GROUP_DOC[fmt][1])
        except Exception as exc:
            raise _as_error(exc, self.loc, "writing") from None

    def _store_layout(self, fmt: int) -> tuple[list[str], dict[str, dict[str, Any]]]:
        """Period labels along the stored time axis, and the CF encoding of each stored cube variable."""
        try:
            stored = xr.open_zarr(self._store(), consolidated=False, zarr_format=_zf(fmt))
        except Exception as exc:
            raise _as_error(exc, self.loc, "reading") from None
        encodings = {
            name: {k: v for k, v in stored[name].encoding.items() if k in _CF_ENCODING_KEYS}
            for name in self.cube_vars
        }
        return _labels(stored["time"].values), encodings

    def _done_markers(self) -> set[str]:
        root = self.loc.join(MARKER_DIR)
        try:
            found = self.loc.fs.find(root)
        except FileNotFoundError:
            return set()
        except Exception as exc:
            raise storage_error(exc, self.loc, "listing progress markers of") from None
        prefix = root.rstrip("/") + "/"
        return {p[len(prefix) :] for p in found if p.startswith(prefix)}

    def _rm(self, sub: str) -> None:
        """Remove ``sub`` (object or prefix) inside the store; nothing outside it."""
        remove_in_store(self.loc, sub)

    def _write_stac(self, fmt: int, fingerprint: str) -> str:
        return write_stac_item(self.loc, fmt, fingerprint)


def remove_in_store(loc: Location, sub: str) -> None:
    """Remove ``sub`` (object or prefix) inside the store at ``loc``; nothing outside it (a missing ``sub`` is
    fine). Raises :class:`~ndvi_scale.errors.StorageError`."""
    path = loc.join(sub)
    try:
        if loc.is_local:
            if os.path.isdir(path):
                shutil.rmtree(path)
            elif os.path.lexists(path):
                os.remove(path)
            return
        fs = loc.fs
        doomed = [p for p in fs.find(path) if p == path or p.startswith(path + "/")]
        if doomed:
            fs.rm(doomed)
            _remove_kept_folders(fs, path, doomed)
    except FileNotFoundError:
        return
    except Exception as exc:
        raise storage_error(exc, loc, "cleaning up") from None


def _remove_kept_folders(fs: Any, path: str, removed: Sequence[str]) -> None:
    """Remove the folders an object store kept for the prefix ``path`` once its objects are gone.

    S3 servers backed by a file system (SeaweedFS: directories are entries of its filer) keep a folder for every
    prefix that held objects, and list it. Left at a cube's root, ``zarr``/``xarray`` opening the cube without
    consolidated metadata warn ``Object at .ndvi-scale is not recognized as a component of a Zarr hierarchy``.
    Such a folder goes with a DELETE of ``<prefix>/`` once it is empty, so deepest first. On a store that keeps
    no folders (AWS S3, GCS) the prefix is gone with its objects: one listing, nothing deleted."""
    fs.invalidate_cache(path)  # the prefix and its parents: the listing below asks the store again
    parent = posixpath.dirname(path)
    if not any(p.rstrip("/") == path for p in fs.ls(parent, detail=False)):
        return
    folders = {path}
    for p in removed:
        d = posixpath.dirname(p)
        while d.startswith(path + "/"):
            folders.add(d)
            d = posixpath.dirname(d)
    for folder in sorted(folders, key=lambda f: -f.count("/")):
        try:
            fs.rm_file(folder + "/")
        except FileNotFoundError:
            pass
    fs.invalidate_cache(path)


def prepare_stac_item() -> threading.Thread:
    """Load what checking the cube's STAC item needs, in a daemon thread (returned, started): pystac's first
    ``Item.from_dict`` imports its extensions' hooks and reads entry points, ~45 ms of one core (measured) at the
    very end of a run, when nothing else runs. :func:`write_cube` starts it first, while a run's first reads are
    in flight and the cores wait. A failure here changes nothing: :func:`write_stac_item` meets it again."""

    def load() -> None:
        try:
            import pystac

            pystac.Item.from_dict({
                "type": "Feature", "stac_version": "1.1.0", "id": "warm-up", "geometry": None, "links": [],
                "assets": {}, "properties": {"datetime": "2024-01-01T00:00:00Z"},
                "stac_extensions": list(STAC_ITEM_EXTENSIONS),
            })
        except Exception as e:  # noqa: BLE001 - an optimisation only
            log.debug("loading pystac ahead of the STAC item failed: %s", e)

    thread = threading.Thread(target=load, name="ndvi-scale-stac", daemon=True)
    thread.start()
    return thread


def write_stac_item(loc: Location, fmt: int, fingerprint: str) -> str:
    """Write the STAC item of the cube at ``loc`` beside it (``<out>.stac-item.json``, credentials scrubbed);
    returns its URL. Raises :class:`OutputError` if pystac cannot load it, a StorageError if it cannot be put."""
    try:
        # chunks=None: the item needs coordinates and attributes only, read as they are needed (no dask)
        cube = xr.open_zarr(store_from_spec(loc.spec()), decode_coords="all", zarr_format=_zf(fmt), chunks=None)
    except Exception as exc:
        raise _as_error(exc, loc, "reading") from None
    item = scrub_value(stac_item_dict(cube, loc, fmt, fingerprint))  # no URL credentials, ever
    target = loc.sibling(STAC_SUFFIX)
    data = json.dumps(item, indent=2, sort_keys=False).encode()
    try:
        import pystac

        pystac.Item.from_dict(json.loads(data))  # refuse to publish an item pystac cannot load
        target.fs.pipe_file(target.path, data)
    except NdviScaleError:
        raise
    except Exception as exc:
        if _is_storage_failure(exc):
            raise storage_error(exc, target, "writing") from None
        raise OutputError(f"STAC item for {loc.url} is invalid: {redact(str(exc))}") from exc
    return target.url


def consolidate(loc: Location, fmt: int) -> None:
    """Consolidate the metadata of the cube at ``loc`` (Zarr format ``fmt``).

    Done when the template is written (or the time axis grown), so that an unfinished cube opens with plain
    ``xr.open_zarr`` (unwritten regions read as fill values), and again when a write finishes (attributes).
    Raises :class:`~ndvi_scale.errors.StorageError` (or another :class:`OutputError`) on failure.
    """
    import zarr

    try:
        with warnings.catch_warnings():
            # zarr notes that consolidated metadata is not (yet) in the v3 spec; xarray uses it anyway
            warnings.simplefilter("ignore", category=UserWarning)
            zarr.consolidate_metadata(store_from_spec(loc.spec()), zarr_format=_zf(fmt))
    except Exception as exc:
        raise _as_error(exc, loc, "consolidating") from None


# ------------------------------------------------------------------------------------------------- dask task


class _MetadataNotWritten(RuntimeError):
    """A region stopped because the metadata of its new cube could not be written (its error is raised)."""


class _MetadataGate:
    """The metadata of a new cube, written in a thread of its own while the first regions compute (local
    schedulers only: the regions wait for it in this process, by :attr:`key`)."""

    _open: dict[str, _MetadataGate] = {}
    _lock = threading.Lock()

    def __init__(self, write: Callable[[], dict[str, dict[str, Any]]]) -> None:
        import uuid

        self.key = uuid.uuid4().hex
        self._write = write
        self._done = threading.Event()
        self._encodings: dict[str, dict[str, Any]] | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="ndvi-scale-metadata", daemon=True)

    def _run(self) -> None:
        try:
            self._encodings = self._write()
        except BaseException as exc:  # noqa: BLE001 - raised by the writer's thread (raise_failure)
            self._error = exc
        finally:
            self._done.set()

    @contextlib.contextmanager
    def running(self) -> Iterator[_MetadataGate]:
        """Write the metadata in its thread for the duration of the ``with``; never leaves it running."""
        with self._lock:
            self._open[self.key] = self
        try:
            self._thread.start()
        except BaseException:
            with self._lock:
                self._open.pop(self.key, None)
            raise
        try:
            yield self
        finally:
            self._done.wait()
            with self._lock:
                self._open.pop(self.key, None)

    def wait(self) -> dict[str, dict[str, Any]]:
        """The stored encodings of the cube variables, once written; raises if the metadata failed."""
        self._done.wait()
        if self._encodings is None:
            raise _MetadataNotWritten("the metadata of the output could not be written")
        return self._encodings

    def raise_failure(self) -> None:
        """Raise the metadata's own error, if it failed (after it ended)."""
        self._done.wait()
        if self._error is not None:
            raise self._error

    @classmethod
    def wait_for(cls, key: str | None) -> dict[str, dict[str, Any]]:
        with cls._lock:
            gate = cls._open.get(key or "")
        if gate is None:  # a region run outside the write that made it (cannot happen on the local schedulers)
            raise _MetadataNotWritten("a region of a new cube ran where its metadata is not being written")
        return gate.wait()


def _write_region(
    *blocks: np.ndarray,
    names: tuple[str, ...],
    encodings: Mapping[str, Mapping[str, Any]] | None,
    spec: LocationSpec,
    zarr_format: int,
    time_index: tuple[int, ...],
    markers: tuple[str, ...],
    gate: str | None = None,
    block_info: dict[Any, Any] | None = None,
) -> np.ndarray:
    """Write one region (one chunk of every cube variable), then its marker. Runs in a dask worker.

    ``encodings`` None: the cube's metadata is being written in this process (:class:`_MetadataGate` ``gate``):
    the region waits for it and takes the stored encodings from it."""
    import zarr

    if encodings is None:
        encodings = _MetadataGate.wait_for(gate)
    assert block_info is not None
    info = block_info[0]
    (t0, _), (y0, y1), (x0, x1) = info["array-location"]
    _, j, k = info["chunk-location"]
    t = time_index[t0]
    store = store_from_spec(spec)
    for name, block in zip(names, blocks, strict=True):
        # Encode exactly as xarray would for this stored variable (NaN/NaT fill, datetime units, dtype), then
        # write the one chunk with zarr: a region is chunk-aligned, and going direct saves xarray's listing
        # and reading of every array's metadata on each region (a dozen requests on object storage).
        data = _encode_block(name, block, encodings[name])
        array = zarr.open_array(store, path=name, mode="r+", zarr_format=_zf(zarr_format))
        if _holds_data(data, array.fill_value):
            # zarr checks every chunk for "all fill value" (to store none): full passes over it and a
            # chunk-sized temporary, ~7-12 ms per 2048^2 chunk; a sample already shows it is not.
            array = array.with_config({"write_empty_chunks": True})
        array[t : t + 1, y0:y1, x0:x1] = data
    # The marker goes last: its presence guarantees every chunk of the region is stored.
    loc = location_from_spec(spec)
    loc.fs.pipe_file(loc.join(MARKER_DIR, markers[t0], f"{j}-{k}"), b"")
    return np.ones((1, 1, 1), dtype=bool)


#: Step of the sparse sample :func:`_holds_data` looks at (a prime: no alignment with fields or tiles).
_SAMPLE_STEP = 61


def _holds_data(data: np.ndarray, fill: Any) -> bool:
    """True if a sparse sample of ``data`` already holds a value other than ``fill`` (NaN fill: a non-NaN value),
    so the chunk cannot be all fill; False means "not known" (zarr then checks the whole chunk, as by default)."""
    if fill is None:  # zarr never takes such a chunk for empty
        return True
    sample = data[..., ::_SAMPLE_STEP, ::_SAMPLE_STEP]
    fill_value = np.asarray(fill)
    if fill_value.dtype.kind not in "biuf" or data.dtype.kind not in "biuf":
        return False
    if fill_value.dtype.kind == "f" and np.isnan(fill_value):
        return data.dtype.kind == "f" and bool((~np.isnan(sample)).any())
    return bool((sample != fill_value).any())  # -0.0 == 0.0 here: such a sample says "not known", as it should


def _encode_block(name: str, block: np.ndarray, encoding: Mapping[str, Any]) -> np.ndarray:
    """``block`` as stored: exactly what xarray's CF encoder makes of it with ``encoding``.

    Dates (``max_date``) take a shortcut: xarray's encoder infers the units of every block it encodes (a sort
    of all its values: ~0.4 s per 2048^2 block, more than composing it). With the stored units of a whole
    unit since the epoch, an integer dtype and no fill value, the integers are the dates' own (NaT stays
    NaT's int64, as xarray writes it); anything else goes through xarray.
    """
    if block.dtype == np.dtype("datetime64[ns]"):
        fast = _encode_epoch_dates(block, encoding)
        if fast is not None:
            return fast
    var = xr.Variable(_CUBE_DIMS, block, encoding=dict(encoding))
    return np.asarray(xr.conventions.encode_cf_variable(var, name=name).values)


_EPOCH_UNITS = {
    f"{unit} since 1970-01-01{suffix}": ns
    for unit, ns in (
        ("nanoseconds", 1),
        ("microseconds", 10**3),
        ("milliseconds", 10**6),
        ("seconds", 10**9),
        ("minutes", 60 * 10**9),
        ("hours", 3600 * 10**9),
        ("days", 86400 * 10**9),
    )
    for suffix in ("", " 00:00:00")
}


def _encode_epoch_dates(block: np.ndarray, encoding: Mapping[str, Any]) -> np.ndarray | None:
    """datetime64[ns] ``block`` as integer ``<unit> since 1970-01-01`` (NaT as ``_FillValue``, else as NaT's
    int64), or None if xarray must do it."""
    unit_ns = _EPOCH_UNITS.get(str(encoding.get("units")))
    dtype = np.dtype(encoding.get("dtype") or np.int64)
    fill = encoding.get("_FillValue")
    if (
        unit_ns is None
        or encoding.get("calendar", "proleptic_gregorian") != "proleptic_gregorian"
        or dtype not in (np.dtype(np.int64), np.dtype(np.int32))
        or (dtype == np.int32 and fill is None)  # NaT's int64 does not fit
        or any(k in encoding for k in ("missing_value", "scale_factor", "add_offset"))
    ):
        return None
    ints = block.view(np.int64).reshape(-1)
    out = np.empty(ints.shape, dtype=dtype)
    nat_int = np.iinfo(np.int64).min
    stored_nat = nat_int if fill is None else int(fill)
    info = np.iinfo(np.int32) if dtype == np.int32 else None
    for start in range(0, ints.size, DATE_STEP):
        part = ints[start : start + DATE_STEP]
        nat = part == nat_int
        whole, rest = np.divmod(part, unit_ns)
        dated = ~nat
        if rest[dated].any():  # not whole units: xarray changes the units (and warns); let it
            return None
        if info is not None:
            valid = whole[dated]
            if valid.size and (valid.min() < info.min or valid.max() > info.max):
                return None
        whole[nat] = stored_nat
        out[start : start + part.size] = whole
    return out.reshape(block.shape)


class _ProgressCallback(Callback):
    """Counts finished region tasks on the local schedulers (runs in the scheduler's thread; with
    :func:`ndvi_scale.waves.run_in_order`, in the threads of the regions: hence the lock)."""

    def __init__(self, keys: set[Any], total: int, fn: ProgressCallback) -> None:
        super().__init__()
        self._keys = keys
        self._total = total
        self._fn = fn
        self._done = 0
        self._lock = threading.Lock()

    def _posttask(self, key: Any, result: Any, dsk: Any, state: Any, id: Any) -> None:
        if key in self._keys:
            with self._lock:
                self._done += 1
                self._fn(self._done, self._total)


def _in_process_scheduler() -> bool:
    """Whether dask's scheduler in use runs the tasks in this process: threaded or synchronous, or none set (the
    threaded one, dask's default for arrays), not a distributed client or the process pool."""
    import dask.local
    import dask.threaded

    return dask.base.get_scheduler() in (None, dask.threaded.get, dask.local.get_sync)


def _active_client() -> Any:
    """The distributed Client that dask would use now, if any (else the local threaded scheduler is used)."""
    scheduler = dask.base.get_scheduler()
    owner = getattr(scheduler, "__self__", None)
    if owner is not None and type(owner).__name__ == "Client":
        return owner
    return None


# ------------------------------------------------------------------------------------------------- STAC


def stac_item_dict(
    cube: xr.Dataset,
    loc: Location,
    zarr_format: int,
    fingerprint: str,
    now: dt.datetime | None = None,
) -> dict[str, Any]:
    """A STAC 1.1 Item (dict) describing the cube at ``loc``, written beside it (``<cube>.stac-item.json``): WGS84
    footprint, time range, projection v2 (``proj:code``), datacube v2.3 (with ``nodata``), processing, and the
    cube as asset (href relative to the item, media type ``application/vnd.zarr; version=N``), plus a self link
    to where the item is written. Valid against the schemas it declares (stac-validator: tests/test_outputs.py)."""
    from pyproj import CRS, Transformer

    crs = cube.rio.crs
    x, y = cube["x"].values, cube["y"].values
    rx, ry = _resolution(x), _resolution(y)
    left, right = float(x.min()) - abs(rx) / 2, float(x.max()) + abs(rx) / 2
    bottom, top = float(y.min()) - abs(ry) / 2, float(y.max()) + abs(ry) / 2
    ring = _densified_ring(left, bottom, right, top, 16)
    if crs is not None:
        to_wgs84 = Transformer.from_crs(CRS.from_user_input(crs.to_wkt()), "EPSG:4326", always_xy=True)
        lons, lats = to_wgs84.transform([p[0] for p in ring], [p[1] for p in ring])
        ring = list(zip(lons, lats, strict=True))
    lons = [p[0] for p in ring]
    lats = [p[1] for p in ring]
    bbox = [min(lons), min(lats), max(lons), max(lats)]
    geometry = {"type": "Polygon", "coordinates": [[[round(a, 7), round(b, 7)] for a, b in ring]]}
    aoi = _json_attr(get_attr(cube.attrs, "aoi"))
    if isinstance(aoi, dict) and isinstance(aoi.get("geometry"), dict):  # the footprint is the AOI, not the grid
        geometry, bbox = _rounded_geometry(aoi["geometry"])
    starts = cube["time"].values
    ends = cube["time_end"].values if "time_end" in cube.coords else starts
    start = _iso(starts.min())
    end = _iso_end(ends.max())
    # Pixel-edge affine (x0 at the left edge, y0 at the top edge for north-up grids).
    transform = [rx, 0.0, float(x[0]) - rx / 2, 0.0, ry, float(y[0]) - ry / 2]
    epsg = crs.to_epsg() if crs is not None else None
    cfg = _json_attr(get_attr(cube.attrs, "config"))
    method = str(get_attr(cube.attrs, "method") or (cfg.get("method") if isinstance(cfg, dict) else "") or "?")
    period = str(get_attr(cube.attrs, "period") or (cfg.get("period") if isinstance(cfg, dict) else "") or "?")
    name = loc.name
    item_id = name[: -len(".zarr")] if name.endswith(".zarr") else name
    props: dict[str, Any] = {
        "datetime": None,
        "start_datetime": start,
        "end_datetime": end,
        "title": str(cube.attrs.get("title", item_id)),
        "proj:code": f"EPSG:{epsg}" if epsg else None,
        "proj:shape": [int(y.size), int(x.size)],
        "proj:transform": transform,
        "processing:software": {"ndvi-scale": _software_version()},
        "processing:lineage": (
            f"Sentinel-2 L2A scenes, SCL cloud/shadow-masked, NDVI per clear day, {method} composite per "
            f"{period} by ndvi-scale"
        ),
        "processing:level": "L3",
        "processing:datetime": (now or dt.datetime.now(dt.UTC)).astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "ndvi_scale:fingerprint": fingerprint,
        "ndvi_scale:periods": len(starts),
        **_skipped_property(cube.attrs),
        **_mask_filters_property(cube.attrs),
        "cube:dimensions": {
            "time": {"type": "temporal", "extent": [start, end]},
            "x": {
                "type": "spatial",
                "axis": "x",
                "extent": [left, right],
                "step": rx,
                "reference_system": epsg,
            },
            "y": {
                "type": "spatial",
                "axis": "y",
                "extent": [bottom, top],
                "step": ry,
                "reference_system": epsg,
            },
        },
        "cube:variables": {
            str(n): {
                "type": "data",
                "dimensions": list(_CUBE_DIMS),
                "data_type": _stac_dtype(v.encoding.get("dtype", v.dtype)),
                **({"description": str(v.attrs["long_name"])} if "long_name" in v.attrs else {}),
                **_stac_unit(v),
                **_stac_nodata(v),
            }
            for n, v in cube.data_vars.items()
            if v.dims == _CUBE_DIMS
        },
    }
    if epsg is None and crs is not None:
        props["proj:code"] = None
        props["proj:wkt2"] = crs.to_wkt()
    if isinstance(cfg, dict):
        props["ndvi_scale:config"] = scrub_value(_without_secrets(cfg))
    open_kwargs: dict[str, Any] = {
        "engine": "zarr",
        "chunks": {},
        "consolidated": True,
        "decode_coords": "all",
    }
    asset: dict[str, Any] = {
        "href": f"./{name}",  # the item sits beside the cube: relative, so both can be moved or served together
        "type": f"{ZARR_MEDIA_TYPE}; version={int(zarr_format)}",
        "title": f"NDVI composite cube (Zarr v{zarr_format})",
        "roles": ["data"],
        "xarray:open_kwargs": open_kwargs,
    }
    if loc.endpoint and not loc.is_local and loc.protocol == "s3":
        asset["xarray:storage_options"] = {"endpoint_url": loc.endpoint}
    elif loc.endpoint and loc.protocol == "gs" and loc.storage_options.get("endpoint_url"):
        asset["xarray:storage_options"] = {"endpoint_url": loc.endpoint}
    return {
        "type": "Feature",
        "stac_version": "1.1.0",
        "stac_extensions": list(STAC_ITEM_EXTENSIONS),
        "id": item_id,
        "geometry": geometry,
        "bbox": [round(v, 7) for v in bbox],
        "properties": props,
        "links": [{"rel": "self", "href": loc.sibling(STAC_SUFFIX).url, "type": "application/geo+json"}],
        "assets": {"zarr": asset},
    }


def _mask_filters_property(attrs: Mapping[str, Any]) -> dict[str, Any]:
    """``ndvi_scale:mask_filters``: the cube's mask filters (op, metres, pixels, classes), as its attribute says;
    nothing for a cube written before they existed."""
    filters = _json_attr(get_attr(attrs, "mask_filters"))
    return {"ndvi_scale:mask_filters": filters} if isinstance(filters, list) else {}


def aoi_digest(attrs: Mapping[str, Any]) -> str | None:
    """The AOI digest in a cube's (or run's) attributes, None without an AOI."""
    aoi = _json_attr(get_attr(attrs, "aoi"))
    return str(aoi.get("digest")) if isinstance(aoi, dict) and aoi.get("digest") else None


def _aoi_difference(cube_attrs: Mapping[str, Any], run_attrs: Mapping[str, Any]) -> str | None:
    """How the AOI of a cube and of a run differ (digest and source), None when they are the same."""
    a, b = aoi_digest(cube_attrs), aoi_digest(run_attrs)
    if a == b:
        return None

    def what(attrs: Mapping[str, Any], digest: str | None) -> str:
        if digest is None:
            return "none (the whole bbox)"
        aoi = _json_attr(get_attr(attrs, "aoi"))
        source = str(aoi.get("source", "?"))
        return f"{digest[:19]}… from {shown_text(source.rstrip('/').rsplit('/', 1)[-1])}"  # the file's name

    return f"AOI: cube {what(cube_attrs, a)}, this run {what(run_attrs, b)} (use the cube's --aoi)"


def _rounded_geometry(geometry: Mapping[str, Any]) -> tuple[dict[str, Any], list[float]]:
    """A GeoJSON (Multi)Polygon with coordinates rounded to 7 decimals (~1 cm), and its bbox."""
    import shapely

    geom = shapely.set_precision(shapely.from_geojson(json.dumps(geometry)), 1e-7)
    return json.loads(shapely.to_geojson(geom)), [float(v) for v in shapely.bounds(geom)]


def _skipped_property(attrs: Mapping[str, Any]) -> dict[str, Any]:
    """``ndvi_scale:skipped_assets`` for the STAC item: the assets the cube lacks (item, band, href)."""
    skipped = _json_attr(get_attr(attrs, "skipped_assets"))
    if not isinstance(skipped, list) or not skipped:
        return {}
    return {STAC_SKIPPED_PROP: [scrub_value({k: e.get(k) for k in ("item", "band", "href", "error")})
                                for e in skipped]}


def _densified_ring(
    left: float, bottom: float, right: float, top: float, n: int
) -> list[tuple[float, float]]:
    """Closed counter-clockwise ring along the grid edges, n points per side (UTM edges curve in WGS84)."""
    pts: list[tuple[float, float]] = []
    for i in range(n):
        pts.append((left + (right - left) * i / n, bottom))
    for i in range(n):
        pts.append((right, bottom + (top - bottom) * i / n))
    for i in range(n):
        pts.append((right - (right - left) * i / n, top))
    for i in range(n):
        pts.append((left, top - (top - bottom) * i / n))
    pts.append(pts[0])
    return pts


# ------------------------------------------------------------------------------------ small helpers


def _quiet_marker_warnings() -> None:
    """Markers sit inside the store while a write runs and zarr warns about them whenever it lists the group
    (xarray does, for every region). Harmless, so silenced - at each call rather than at import, because
    callers
    (pytest among them) may reset the warning filters in between; adding the same filter again is a no-op."""
    warnings.filterwarnings(
        "ignore", message=r"Object at \.ndvi-scale is not recognized", category=UserWarning
    )


#: Temporary file of zarr's LocalStore (``<key>.<uuid4 hex>.partial``): every chunk and metadata file is written
#: to one and then renamed over the key, so a process killed mid-write (SIGKILL, OOM kill) leaves one behind.
_PARTIAL_RE = re.compile(r"\.[0-9a-f]{32}\.partial$")


def _partial_files(root: str) -> list[str]:
    """Paths of zarr LocalStore temporary files below the local folder ``root``."""
    found: list[str] = []
    for folder, _dirs, files in os.walk(root):
        found.extend(os.path.join(folder, f) for f in files if _PARTIAL_RE.search(f))
    return sorted(found)


def _only_partial_files(root: str) -> bool:
    """True if the local folder ``root`` holds nothing but folders and zarr temporary files (at least one)."""
    seen = False
    for _folder, _dirs, files in os.walk(root):
        for f in files:
            if not _PARTIAL_RE.search(f):
                return False
            seen = True
    return seen


def _remove_partial_files(loc: Location) -> int:
    """Delete the temporary files a killed write left in the local cube ``loc`` (object stores write each
    object atomically and leave none). They are never part of the cube: the chunk they were meant for has no
    marker, so its region is written again. Returns how many were removed."""
    if not loc.is_local or not os.path.isdir(loc.path):
        return 0
    removed = 0
    for path in _partial_files(loc.path):
        try:
            os.remove(path)
            removed += 1
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise storage_error(exc, loc, "cleaning up") from None
    if removed:
        log.info("removed %d temporary file(s) of an interrupted write from %s", removed, loc.url)
    return removed


def _refuse_bucket_root(loc: Location) -> None:
    if not loc.is_local and not loc.key:
        raise InputError(
            f"out {loc.url} is a bucket root; give a path inside the bucket, e.g. {loc.url}/ndvi.zarr"
        )


def _as_slice(index: list[int]) -> slice | list[int]:
    """A run of consecutive indices as a slice: selecting every period then adds no getitem tasks (dask
    returns the array itself), so the casts of ``build()``'s Dataset fuse into the region writes (one task per
    region besides the composite), and a run of new periods is one slice, not a fancy index per block."""
    if index and index == list(range(index[0], index[-1] + 1)):
        return slice(index[0], index[-1] + 1)
    return index


def _cube_vars(ds: xr.Dataset) -> list[str]:
    return [str(n) for n, v in ds.data_vars.items() if v.dims == _CUBE_DIMS]


def _template(ds: xr.Dataset) -> xr.Dataset:
    """Dataset to write as metadata + coordinates: encodings reset (deterministic output whatever the source),
    CF ``grid_mapping`` kept as an attribute (rioxarray keeps it in ``encoding``, which the Zarr backend
    drops),
    small lazy coordinates loaded (so that ``compute=False`` writes them now)."""
    out = ds.copy()
    for name in list(out.variables):
        var = out[name]
        attrs = dict(var.attrs)
        gm = var.encoding.get("grid_mapping")
        if gm and "grid_mapping" not in attrs:
            attrs["grid_mapping"] = gm
        out[name].attrs = attrs
        out[name].encoding = {}
    lazy = {k: v.compute() for k, v in out.coords.items() if isinstance(v.data, da.Array)}
    if lazy:
        out = out.assign_coords(lazy)
    data_lazy = {k: v.compute() for k, v in out.data_vars.items() if k not in _cube_vars(out) and v.chunks}
    if data_lazy:
        out = out.assign(data_lazy)
    out.attrs = _cf_attrs(out.attrs)
    return out


def _encoding(
    tmpl: xr.Dataset, cube_vars: Sequence[str], fmt: int = 3, codec: str = DEFAULT_CODEC
) -> dict[str, dict[str, Any]]:
    enc: dict[str, dict[str, Any]] = {}
    for name in cube_vars:
        data = tmpl[name].data
        chunks = (1, int(data.chunks[1][0]), int(data.chunks[2][0]))
        e: dict[str, Any] = {"chunks": chunks, "compressors": compressors(codec, fmt)}
        dtype = tmpl[name].dtype
        if np.issubdtype(dtype, np.floating):
            e["_FillValue"] = dtype.type(np.nan)  # NaN = no valid observation
        elif np.issubdtype(dtype, np.datetime64):
            e.update(date_encoding())  # int32 days since 1970-01-01, explicit fill = no observation
        elif np.issubdtype(dtype, np.integer) or dtype == np.bool_:
            # Counts: 0 is a value, not "missing": no CF _FillValue. Zarr v3 requires a fill value, which GDAL takes
            # for no-data: one that no count reaches. (v2 stores none.)
            e["_FillValue"] = None
            if fmt == 3 and np.issubdtype(dtype, np.integer):
                e["fill_value"] = min(COUNT_FILL, int(np.iinfo(dtype).max))
        enc[name] = e
    for key, var in tmpl.coords.items():
        if var.dims[:1] == ("time",) and var.ndim <= 2:  # time, time_end, time_bnds (time, bnds)
            e = {"chunks": (TIME_COORD_CHUNK, *var.shape[1:])}
            if np.issubdtype(var.dtype, np.datetime64):
                e.update(_TIME_ENCODING)
                if var.ndim == 2:
                    # CF bounds in the units of time, as float64 (exact for whole seconds): CF checkers older
                    # than CF-1.9 (cfchecker 4.1) take int64 for non-numeric, which bounds must not be.
                    e["dtype"] = "float64"
                    e["_FillValue"] = None  # CF: bounds have no fill value
            enc[str(key)] = e
    for key in tmpl.variables:  # every array in the one codec: GDAL reads x and y for the geotransform
        enc.setdefault(str(key), {})["compressors"] = compressors(codec, fmt)
    return enc


def compressors(codec: str, fmt: int) -> tuple[Any, ...]:
    """The Zarr compressor(s) of ``codec`` for Zarr format ``fmt``.

    ``zstd`` (default: smallest and fastest to write, see README), ``zlib`` (DEFLATE: zlib in v2, gzip in v3,
    readable by every GDAL with Zarr support, including builds without zstd or blosc), ``lz4`` (blosc-lz4, what
    ndvi-scale wrote in v2 before), ``none``.
    """
    if codec == "none":
        return ()
    if fmt == 2:
        import numcodecs

        v2 = {
            "zstd": lambda: numcodecs.Zstd(level=3),
            "zlib": lambda: numcodecs.Zlib(level=6),
            "lz4": lambda: numcodecs.Blosc(cname="lz4", clevel=5, shuffle=numcodecs.Blosc.SHUFFLE),
        }
        return (v2[codec](),)
    from zarr import codecs

    v3 = {
        "zstd": lambda: codecs.ZstdCodec(level=3),
        "zlib": lambda: codecs.GzipCodec(level=6),
        "lz4": lambda: codecs.BloscCodec(cname="lz4", clevel=5, shuffle="shuffle"),
    }
    return (v3[codec](),)


def _codec_of(ds: xr.Dataset, codec: str | None) -> str:
    """``codec``, else the run config's (``ds`` attributes), else :data:`DEFAULT_CODEC`; checked."""
    if codec is None:
        cfg = _json_attr(get_attr(ds.attrs, "config"))
        codec = cfg.get("codec") if isinstance(cfg, dict) else None
    codec = str(codec or DEFAULT_CODEC).strip().lower()
    codec = {"gzip": "zlib", "deflate": "zlib", "blosc-lz4": "lz4"}.get(codec, codec)
    if codec not in CODECS:
        raise InputError(f"codec {codec!r} is unknown; expected one of {', '.join(CODECS)}")
    return codec


def _renamed(attrs: Mapping[str, Any]) -> dict[str, Any]:
    """Root attributes with the legacy ``ndvi_scale:*`` names of older cubes under their ``ndvi_scale_*`` names
    (a name written both ways keeps its new value)."""
    out = {}
    for k, v in attrs.items():
        new = "ndvi_scale_" + k[len(LEGACY_PREFIX) :] if k.startswith(LEGACY_PREFIX) else k
        if new == k or new not in attrs:
            out[new] = v
    return out


def _cf_attrs(attrs: Mapping[str, Any]) -> dict[str, Any]:
    """Dataset attributes minus the write bookkeeping (which write_cube owns), every URL in them cleaned (no
    credentials, no query strings: :func:`ndvi_scale.faults.scrub`)."""
    return {k: scrub_value(v) for k, v in attrs.items() if k not in (CUBE_ATTR, WRITE_ATTR, RUNS_ATTR)}


def _array_dims(arr: Any) -> tuple[str, ...]:
    names = getattr(arr.metadata, "dimension_names", None)
    if names:
        return tuple(str(n) for n in names)
    return tuple(arr.attrs.get("_ARRAY_DIMENSIONS", ()))


def _labels(values: np.ndarray) -> list[str]:
    """Period labels: ``YYYY-MM-DD`` at midnight, else ISO seconds (used in markers and messages)."""
    out = []
    for v in np.asarray(values).astype("datetime64[s]"):
        s = str(v)
        out.append(s[:10] if s.endswith("T00:00:00") else s)
    return out


def _zf(fmt: int) -> ZarrFormat:
    return 2 if fmt == 2 else 3


def _marker_name(label: str) -> str:
    return label.replace(":", "")


def _iso(value: Any) -> str:
    return str(np.asarray(value).astype("datetime64[s]")) + "Z"


def _iso_end(value: np.datetime64) -> str:
    """Inclusive period end: a date at midnight means the whole day."""
    v = np.asarray(value).astype("datetime64[s]")
    if str(v).endswith("T00:00:00"):
        v = v + np.timedelta64(86399, "s")
    return str(v) + "Z"


def _resolution(values: np.ndarray) -> float:
    return float(values[1] - values[0]) if values.size > 1 else float("nan")


def _crs_name(crs: Any) -> str:
    if crs is None:
        return "none"
    epsg = crs.to_epsg()
    return f"EPSG:{epsg}" if epsg else crs.to_wkt()[:60]


def _fmt_vars(v: Mapping[str, str]) -> str:
    return ", ".join(f"{k} ({t})" for k, t in sorted(v.items())) or "none"


def _without_secrets(value: Any) -> Any:
    """A copy of a JSON-like value without entries whose key names a secret (published in the STAC item)."""
    if isinstance(value, dict):
        return {
            k: _without_secrets(v)
            for k, v in value.items()
            if not any(s in str(k).lower() for s in ("secret", "token", "password", "credential"))
        }
    if isinstance(value, list):
        return [_without_secrets(v) for v in value]
    return value


def _stac_dtype(dtype: Any) -> str:
    """STAC data type of a stored variable (dates are stored as integers: their encoding's dtype)."""
    dtype = np.dtype(dtype)
    if np.issubdtype(dtype, np.datetime64):
        return "int64"
    return str(dtype.name)


def _stac_unit(var: xr.DataArray) -> dict[str, Any]:
    units = var.attrs.get("units", var.encoding.get("units"))
    return {"unit": str(units)} if units is not None else {}


def _stac_nodata(var: xr.DataArray) -> dict[str, Any]:
    """``nodata`` of a stored variable (datacube v2.3): its CF fill value; none for counts (0 is a value)."""
    fill = var.encoding.get("_FillValue", var.attrs.get("_FillValue"))
    if fill is None:
        return {}
    value = float(np.asarray(fill).item()) if not isinstance(fill, str) else float("nan")
    if math.isnan(value):
        return {"nodata": "nan"}
    if math.isinf(value):
        return {"nodata": "inf" if value > 0 else "-inf"}
    return {"nodata": int(value) if value.is_integer() else value}


def _dumps(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def _json_attr(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def _software_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("ndvi-scale")
    except PackageNotFoundError:
        return "0+unknown"


def _is_storage_failure(exc: BaseException) -> bool:
    from .storage import _classify

    return _classify(exc) != "other" or isinstance(exc, OSError)


def _as_error(exc: BaseException, loc: Location, action: str) -> NdviScaleError:
    if isinstance(exc, NdviScaleError):
        return exc
    if _is_storage_failure(exc):
        return storage_error(exc, loc, action)
    return OutputError(
        f"{action} {loc.url} failed: {type(exc).__name__}: {redact(str(exc), loc.storage_options)}"
    )
