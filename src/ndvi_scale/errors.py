"""One exception tree for ndvi-scale.

Every error a user can cause or meet is an :class:`NdviScaleError`. Messages follow one shape: what is wrong (naming
the field and the bad value), what was expected, and how to fix it. The CLI prints ``error: <message>`` on one line
and exits with :attr:`NdviScaleError.exit_code`; it never prints a traceback for these.
"""

from __future__ import annotations

import reprlib
from typing import Any

#: Longest user value (characters) quoted in a message: a 20 MB --method must not give a 20 MB error line.
MAX_QUOTED = 80
#: Longest error line the CLI prints (the last resort: every quoted value is already cut to MAX_QUOTED).
MAX_LINE = 300

_repr = reprlib.Repr()
_repr.maxstring = _repr.maxother = _repr.maxlong = MAX_QUOTED
_repr.maxlist = _repr.maxtuple = _repr.maxdict = _repr.maxset = _repr.maxfrozenset = 8
_repr.maxlevel = 3


def cut(text: str, limit: int = MAX_QUOTED) -> str:
    """``text`` cut to ``limit`` characters, the cut marked with an ellipsis."""
    text = str(text)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def shown(value: Any, limit: int = MAX_QUOTED) -> str:
    """A user value as quoted in a message (``repr``-like), at most ``limit`` characters: whatever its size or
    nesting (an alias-bomb list, a 20 MB string), the cost and the length are bounded."""
    if isinstance(value, str):
        return cut(repr(value[: limit + 2]), limit) if len(value) > limit else cut(repr(value), limit)
    try:
        text = _repr.repr(value)
    except Exception:  # a repr that fails: its type is enough
        text = f"<{type(value).__name__}>"
    return cut(text, limit)


def exception_chain(exc: BaseException, limit: int = 10) -> list[BaseException]:
    """``exc`` and its causes/contexts, outermost first (cycles cut, at most ``limit``)."""
    seen: list[BaseException] = []
    cur: BaseException | None = exc
    while cur is not None and cur not in seen and len(seen) < limit:
        seen.append(cur)
        cur = cur.__cause__ or cur.__context__
    return seen


class NdviScaleError(Exception):
    """Base class of every error raised on purpose by ndvi-scale."""

    #: process exit code used by the CLI
    exit_code: int = 1


class InputError(NdviScaleError, ValueError):
    """A user-supplied value (bbox, dates, period, method, path, config file) is invalid."""

    exit_code = 2


class CatalogError(NdviScaleError):
    """The catalog cannot be resolved, opened or searched."""

    exit_code = 3


class NoScenesError(CatalogError):
    """The search returned no usable Sentinel-2 L2A scene."""

    exit_code = 4


class ItemError(NdviScaleError):
    """A STAC item cannot be interpreted as Sentinel-2 L2A (missing band, CRS, ...)."""

    exit_code = 5


class OutputError(NdviScaleError):
    """The output store cannot be written as asked."""

    exit_code = 6


class OutputExistsError(OutputError):
    """The output already exists and ``--overwrite`` was not given."""

    exit_code = 7


class GridMismatchError(OutputError):
    """The existing output cube has another grid (CRS, resolution, extent, chunks) than this run."""

    exit_code = 8


class StorageError(OutputError):
    """Object storage (gs://, s3://, local) refused or could not be reached."""

    exit_code = 9


class ReadError(NdviScaleError):
    """Pixel reads failed after retries."""

    exit_code = 10


class ClusterError(NdviScaleError):
    """The requested Dask cluster cannot be reached, created or used."""

    exit_code = 11


class RunTooLargeError(NdviScaleError):
    """The run is above the size guard (output bytes or regions) and was not confirmed (``--yes``)."""

    exit_code = 12
