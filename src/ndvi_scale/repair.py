"""Repair stage: bring a cube whose write was stopped back to a complete state, without its inputs.

``ndvi-scale repair OUT`` (:func:`repair_cube`) is the way out of a cube that the command that started its write
can no longer finish: the catalog changed (reprocessed or new scenes), the relative window moved, the run was
an OOM-killed CronJob. Recovery, never deletion:

* **Unfinished write** (state ``template`` or ``regions``): rolled back to its last complete state. Periods the
  cube held before the write stay untouched; periods of the stopped write that are complete (every region has
  its marker) stay too, as many as follow one another from the first one (the time axis can only be cut at its
  end); the rest is cut off (``zarr`` deletes the chunks past the new length). The state becomes ``complete``,
  the markers and temporary files go, the metadata is consolidated and the STAC item rewritten. The next
  ``compute --append`` then adds the missing periods as usual.
* **Complete cube whose last steps were stopped** (markers left, metadata not consolidated, no STAC item or a
  stale one): those steps are done again.
* **Refused, nothing changed**: periods recomputed in place (``--append --overwrite``) that are only partly
  rewritten (their old values are gone: only the command that started it can finish them), and a first write
  stopped before any period was complete (nothing to roll back to: re-run it, or ``--overwrite``).

The repair takes the writer lease like any write, so it never runs beside a write; it is idempotent (a repair
stopped half-way is finished by the next one: the write state turns ``complete`` before the markers go).
"""

from __future__ import annotations

import datetime as dt
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import xarray as xr

from .cf import merge_history
from .errors import NdviScaleError, OutputError
from .storage import Location, open_location, storage_error, store_from_spec
from .write import (
    _CUBE_LAYOUT,
    CUBE_ATTR,
    MARKER_DIR,
    MARKER_PREFIX,
    RUNS_ATTR,
    WRITE_ATTR,
    WriterLease,
    _array_dims,
    _as_error,
    _dumps,
    _Existing,
    _finish_pending,
    _inspect,
    _json_attr,
    _labels,
    _marker_name,
    _refuse_bucket_root,
    _remove_partial_files,
    _renamed,
    _software_version,
    _zf,
    consolidate,
    remove_in_store,
    write_stac_item,
)

__all__ = ["RepairReport", "repair_cube"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RepairReport:
    """What :func:`repair_cube` did."""

    url: str
    """Credential-free URL of the cube."""
    action: str
    """``rolled back`` (an unfinished write), ``finished`` (a complete cube's last steps) or ``nothing``."""
    periods: tuple[str, ...]
    """Periods in the cube after the repair (start dates, YYYY-MM-DD)."""
    kept: tuple[str, ...] = ()
    """Periods of the stopped write that were complete and stay."""
    dropped: tuple[str, ...] = ()
    """Periods of the stopped write that were not complete and were cut off (no complete period is ever here)."""
    stac_item_url: str | None = None
    """The STAC item written beside the cube (None when nothing was done)."""

    def summary(self) -> str:
        """One line for the CLI."""
        if self.action == "nothing":
            return f"{self.url} is complete ({len(self.periods)} periods): nothing to repair"
        if self.action == "finished":
            return (f"finished {self.url} ({len(self.periods)} periods): markers removed, metadata consolidated, "
                    f"STAC item {self.stac_item_url}")
        kept = f"kept {len(self.kept)} complete period(s) of it" if self.kept else "kept none of it"
        return (f"rolled back the unfinished write of {self.url}: {kept}, cut off {len(self.dropped)} "
                f"unfinished period(s) ({', '.join(self.dropped) or '-'}); the cube now holds "
                f"{len(self.periods)} complete periods (STAC item {self.stac_item_url}); run compute --append to "
                "add the missing periods")


def repair_cube(out: str | Location, storage_options: Mapping[str, Any] | None = None) -> RepairReport:
    """Finish or roll back the cube at ``out`` to its last complete state (see the module docstring).

    ``out`` is a path, ``s3://`` or ``gs://`` URL (or a :class:`~ndvi_scale.storage.Location`);
    ``storage_options`` go to fsspec. Returns a :class:`RepairReport`.
    Raises :class:`~ndvi_scale.errors.OutputError` when there is no cube at ``out``, another writer holds its
    lease, or the cube cannot be rolled back without losing data (nothing is changed then);
    :class:`~ndvi_scale.errors.StorageError` when the store fails.
    """
    loc = out if isinstance(out, Location) else open_location(str(out), storage_options)
    _refuse_bucket_root(loc)
    loc.check_access()
    with WriterLease(loc):  # never beside a write (nor another repair)
        return _repair(loc)


def _repair(loc: Location) -> RepairReport:
    existing = _inspect(loc)
    if existing.kind == "absent":
        raise OutputError(f"nothing to repair: there is no cube at {loc.url}; check the path given")
    if existing.kind == "foreign":
        raise OutputError(
            f"cannot repair {loc.url}: it is {existing.what}, not an ndvi-scale cube; repair only brings back "
            "cubes written by ndvi-scale compute"
        )
    fmt = existing.zarr_format
    if existing.write.get("state") == "complete":
        periods = tuple(_stored_labels(loc, fmt))
        if not _finish_pending(loc, existing):
            return RepairReport(loc.url, "nothing", periods)
        _remove_partial_files(loc)
        remove_in_store(loc, MARKER_PREFIX)
        consolidate(loc, fmt)
        item = write_stac_item(loc, fmt, str(existing.write.get("fingerprint", "")))
        log.info("finished the complete cube %s", loc.url)
        return RepairReport(loc.url, "finished", periods, stac_item_url=item)
    return _roll_back(loc, existing)


def _roll_back(loc: Location, existing: _Existing) -> RepairReport:
    import zarr

    fmt = existing.zarr_format
    state = dict(existing.write)
    n_before = int(state.get("n_before", 0))
    running = [str(p) for p in state.get("periods", [])]
    _remove_partial_files(loc)
    labels = _stored_labels(loc, fmt)
    try:
        group = zarr.open_group(store_from_spec(loc.spec()), mode="r+", zarr_format=_zf(fmt),
                                use_consolidated=False)
    except Exception as exc:
        raise _as_error(exc, loc, "reading") from None
    done = _done_markers(loc)
    blocks = _region_blocks(group)

    def complete(period: str) -> bool:
        name = _marker_name(period)
        return all(f"{name}/{j}-{k}" in done for j in range(blocks[0]) for k in range(blocks[1]))

    before = labels[:n_before]
    recomputed = [p for p in running if p in before]
    # Regions are only written in the "regions" phase; there, a recomputed period without all its markers may
    # have chunks rewritten (a region writes its chunks, then its marker).
    in_regions = state.get("state") == "regions"
    broken = [p for p in recomputed if in_regions and not complete(p)]
    if broken:
        raise OutputError(
            f"cannot roll back {loc.url}: period(s) {', '.join(broken[:6])} were being recomputed in place "
            "(--append --overwrite) and are only partly rewritten, so their old values are gone; finish them by "
            "re-running the command that started the write, or recompute them with --append --overwrite "
            "(nothing was changed)"
        )
    new = labels[n_before:] if in_regions else []
    kept_new: list[str] = []
    for p in new:  # the time axis can only be cut at its end: complete periods up to the first incomplete one
        if p not in running or not complete(p):
            break
        kept_new.append(p)
    keep = n_before + len(kept_new)
    dropped = [p for p in running if p not in before and p not in kept_new]
    if keep == 0:
        raise OutputError(
            f"nothing to roll back to in {loc.url}: its first write (periods {', '.join(running[:4]) or '?'}"
            f"{', ...' if len(running) > 4 else ''}) was stopped before any period was complete; re-run the "
            "command that started it to finish it, or pass --overwrite to write the cube anew (nothing was "
            "changed)"
        )
    kept = [*(recomputed if in_regions else []), *kept_new]
    try:
        for _, arr in group.arrays():
            dims = _array_dims(arr)
            if dims[:1] == ("time",) and arr.shape[0] != keep:
                arr.resize((keep, *arr.shape[1:]))  # zarr deletes the chunks past the new length
                if arr.ndim <= 2:  # a time coordinate: its last chunk written again without the cut values
                    arr[:keep] = arr[:keep]
        attrs = _renamed(group.attrs)
        runs = _json_attr(attrs.get(RUNS_ATTR))
        runs = runs if isinstance(runs, list) else []
        if kept:
            fingerprint = str(state.get("fingerprint", ""))
            entry = {"fingerprint": fingerprint, "periods": kept, "software": {"ndvi-scale": _software_version()},
                     "repaired": True}
            if entry not in runs:
                runs.append(entry)
            periods = kept
        else:  # back to the state the last complete write left
            last = runs[-1] if runs and isinstance(runs[-1], dict) else {}
            fingerprint, periods = str(last.get("fingerprint", "")), list(last.get("periods", []))
        when = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        line = (f"{when}: ndvi-scale repair: rolled back an unfinished write (kept {', '.join(kept) or 'none'}; "
                f"cut off {', '.join(dropped) or 'none'})")
        update = {
            # complete BEFORE the markers go: a repair stopped after this point is finished by the next one
            WRITE_ATTR: _dumps({"fingerprint": fingerprint, "state": "complete", "periods": periods,
                                "n_before": n_before, "repaired": {"kept": kept, "dropped": dropped}}),
            RUNS_ATTR: _dumps(runs),
            CUBE_ATTR: _CUBE_LAYOUT,
        }
        history = merge_history(line, attrs.get("history"))
        if history:
            update["history"] = history
        group.attrs.update(update)
    except NdviScaleError:
        raise
    except Exception as exc:
        raise _as_error(exc, loc, "rolling back") from None
    remove_in_store(loc, MARKER_PREFIX)
    consolidate(loc, fmt)
    item = write_stac_item(loc, fmt, fingerprint)
    log.info("rolled back %s to %d periods", loc.url, keep)
    return RepairReport(loc.url, "rolled back", tuple(labels[:keep]), tuple(kept), tuple(dropped), item)


def _stored_labels(loc: Location, fmt: int) -> list[str]:
    """Period labels along the stored time axis (metadata read as it is, not consolidated)."""
    try:
        with xr.open_zarr(store_from_spec(loc.spec()), consolidated=False, zarr_format=_zf(fmt),
                          chunks=None) as cube:
            return _labels(cube["time"].values)
    except Exception as exc:
        raise _as_error(exc, loc, "reading") from None


def _done_markers(loc: Location) -> set[str]:
    root = loc.join(MARKER_DIR)
    try:
        found = loc.fs.find(root)
    except FileNotFoundError:
        return set()
    except Exception as exc:
        raise storage_error(exc, loc, "listing progress markers of") from None
    prefix = root.rstrip("/") + "/"
    return {p[len(prefix):] for p in found if p.startswith(prefix)}


def _region_blocks(group: Any) -> tuple[int, int]:
    """Chunks along y and x of the cube's ``ndvi`` (every cube variable has the same chunking)."""
    arr = group["ndvi"]
    return math.ceil(arr.shape[1] / arr.chunks[1]), math.ceil(arr.shape[2] / arr.chunks[2])
