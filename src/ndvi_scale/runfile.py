"""YAML run files for ``ndvi-scale compute --config FILE``, and relative date windows for schedules.

A run file is a flat YAML mapping whose keys are the :class:`~ndvi_scale.config.RunConfig` field names (the
CLI flag names without ``--``); dashes and underscores are interchangeable (``max-cloud`` = ``max_cloud``)::

    bbox: [1.4, 48.1, 1.6, 48.3]
    window: previous-month        # or explicit  start: 2024-01-01  end: 2024-01-31
    catalog: sample
    out: gs://my-bucket/ndvi.zarr
    period: month
    append: true

A ``null`` value means "not set" (the CLI flag or the built-in default applies). Two keys are not RunConfig
fields:

``window``
    A relative period resolved against *today* (UTC) when the run starts, so one file serves every run of a
    schedule. It sets ``start`` and ``end`` and is therefore mutually exclusive with them in the file.
``cluster``
    Where to compute (see :func:`ndvi_scale.cluster.connect`): ``threads``, ``local``, ``tcp://host:port``,
    ``gateway`` or ``kubernetes``.

Window grammar (case-insensitive; ``_`` or spaces may replace ``-``). Every window ends *before* today, so it
only covers complete days, and a monthly job that runs on the 2nd sees the whole previous month:

===================  ================================================================================
``previous-day``     yesterday
``previous-week``    the last complete ISO week, Monday to Sunday
``previous-dekad``   the last complete dekad (days 1-10, 11-20, 21-end of month)
``previous-month``   the last complete calendar month (2024-03-01 -> 2024-02-01 .. 2024-02-29)
``previous-season``  the last complete meteorological season (DJF, MAM, JJA, SON)
``previous-year``    the last complete calendar year
``last-N-days``      the N days before today (N >= 1), e.g. ``last-30-days``
``month-to-date``    the first of this month .. yesterday (empty, hence refused, on the 1st)
===================  ================================================================================

Precedence is CLI flag > file value > RunConfig default (:func:`merge`). A ``--start``/``--end`` on the
command line replaces the file's ``window`` (that is how a backfill re-uses the scheduled job's file).
"""

from __future__ import annotations

import datetime as dt
import difflib
import os
import re
from collections.abc import Mapping
from dataclasses import fields
from typing import Any

import yaml

from .config import PERIODS, RunConfig
from .errors import InputError, cut, shown

#: RunConfig fields a run file may set. ``extra`` is left out: it is free-form provenance, not a user setting.
RUN_CONFIG_KEYS: tuple[str, ...] = tuple(f.name for f in fields(RunConfig) if f.name != "extra")

#: Keys a run file may hold that are not RunConfig fields (see the module docstring).
RUNTIME_KEYS: tuple[str, ...] = ("window", "cluster")

#: Every key a run file may hold, canonical (underscore) spelling.
VALID_KEYS: tuple[str, ...] = RUN_CONFIG_KEYS + RUNTIME_KEYS

#: ``previous-<period>`` windows, one per compositing period, so a schedule can follow its period.
FIXED_WINDOWS: tuple[str, ...] = tuple(f"previous-{p}" for p in PERIODS) + ("month-to-date",)

_LAST_N_DAYS = re.compile(r"^last-(\d{1,5})-days?$")
#: Upper bound for ``last-N-days``: ten years is already a backfill, which should use explicit dates.
MAX_LAST_DAYS = 3660


# ------------------------------------------------------------------------------------------------- windows
def normalise_window(value: Any) -> str:
    """Check a window expression and return its canonical spelling (lower case, dashes)."""
    if not isinstance(value, str) or not value.strip():
        raise InputError(
            f"window {shown(value)} is not a window name; expected one of {', '.join(FIXED_WINDOWS)} or "
            "last-N-days, e.g. window: previous-month"
        )
    w = re.sub(r"[\s_]+", "-", value.strip().lower())
    if w in FIXED_WINDOWS:
        return w
    m = _LAST_N_DAYS.match(w)
    if m:
        n = int(m.group(1))
        if not 1 <= n <= MAX_LAST_DAYS:
            raise InputError(
                f"window {shown(value)} asks for {n} days; expected last-N-days with 1 <= N <= {MAX_LAST_DAYS} "
                "(use explicit start/end for longer backfills)"
            )
        return f"last-{n}-days"
    hint = difflib.get_close_matches(w, [*FIXED_WINDOWS, "last-N-days"], n=1, cutoff=0.6)
    did_you_mean = f" (did you mean {shown(hint[0])}?)" if hint else ""
    raise InputError(
        f"window {shown(value)} is unknown{did_you_mean}; expected one of {', '.join(FIXED_WINDOWS)} or "
        "last-N-days (e.g. last-30-days)"
    )


def utc_today() -> dt.date:
    """Today's date in UTC: schedules run in UTC, whatever the machine's local time zone."""
    return dt.datetime.now(dt.UTC).date()


def _dekad_start(d: dt.date) -> dt.date:
    return d.replace(day=1 if d.day <= 10 else 11 if d.day <= 20 else 21)


def _season_start(d: dt.date) -> dt.date:
    # Meteorological seasons start on 1 Dec, 1 Mar, 1 Jun and 1 Sep; Jan-Feb belong to the previous December.
    if d.month == 12:
        return dt.date(d.year, 12, 1)
    if d.month <= 2:
        return dt.date(d.year - 1, 12, 1)
    return dt.date(d.year, d.month - d.month % 3, 1)


def resolve_window(window: str, today: dt.date | None = None) -> tuple[dt.date, dt.date]:
    """Resolve a window to inclusive ``(start, end)`` dates, both before ``today`` (default: today in UTC).

    >>> resolve_window("previous-month", dt.date(2024, 3, 1))
    (datetime.date(2024, 2, 1), datetime.date(2024, 2, 29))
    """
    w = normalise_window(window)
    if today is None:
        today = utc_today()
    elif isinstance(today, dt.datetime):
        today = today.date()
    one = dt.timedelta(days=1)
    if w == "month-to-date" and today.day == 1:
        raise InputError(
            f"window month-to-date is empty on {today} (the first day of the month has no complete day yet); "
            "use window: previous-month, or run later in the month"
        )
    try:
        if w == "previous-day":
            return today - one, today - one
        if w == "previous-week":
            end = today - dt.timedelta(days=today.weekday() + 1)  # the Sunday before this week's Monday
            return end - dt.timedelta(days=6), end
        if w == "previous-dekad":
            end = _dekad_start(today) - one
            return _dekad_start(end), end
        if w == "previous-month":
            end = today.replace(day=1) - one
            return end.replace(day=1), end
        if w == "previous-season":
            end = _season_start(today) - one
            return _season_start(end), end
        if w == "previous-year":
            return dt.date(today.year - 1, 1, 1), dt.date(today.year - 1, 12, 31)
        if w == "month-to-date":
            return today.replace(day=1), today - one
        m = _LAST_N_DAYS.match(w)
        assert m is not None  # normalise_window accepted it
        n = int(m.group(1))
        return today - dt.timedelta(days=n), today - one
    except (OverflowError, ValueError) as exc:  # dates before year 1
        raise InputError(
            f"window {w} cannot be resolved against today={today}: {exc}; give explicit start and end dates"
        ) from None


# ----------------------------------------------------------------------------------------------- run files
#: Largest run file read (characters): a run file is a dozen lines.
MAX_RUN_FILE = 256 * 1024


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys (PyYAML silently keeps the last one, hiding an override) and
    aliases (``*name``): a run file is flat, and nested aliases make a 512-byte "billion laughs" document whose
    value expands to billions of elements in whatever walks or prints it. Refused while composing, before any
    value is built: in microseconds and bytes of memory."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise _AliasRefused(None, None, f"alias *{cut(str(event.anchor), 40)}", event.start_mark)
        return super().compose_node(parent, index)


class _AliasRefused(yaml.composer.ComposerError):
    """A YAML alias in a run file (see :class:`_UniqueKeyLoader`)."""


def _construct_unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        try:
            hash(key)
        except TypeError:
            continue  # the generic constructor reports unhashable keys
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None,
                None,
                f"key {shown(key)} is given twice (first on line {seen[key]})",
                key_node.start_mark,
            )
        seen[key] = key_node.start_mark.line + 1
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping)


def _bad_timestamp(text: str) -> str:
    """`` line N (value)`` of the first YAML timestamp in ``text`` that is not a real date/time, else ``""``."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except Exception:  # the loader already failed: the location is a nicety
        return ""
    constructor = yaml.SafeLoader("")
    todo = [root] if root is not None else []
    while todo:  # iterative: no recursion on deep documents
        node = todo.pop()
        if isinstance(node, yaml.MappingNode):
            todo.extend(v for pair in reversed(node.value) for v in reversed(pair))
        elif isinstance(node, yaml.SequenceNode):
            todo.extend(reversed(node.value))
        elif isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:timestamp":
            try:
                constructor.construct_yaml_timestamp(node)
            except (ValueError, OverflowError):
                return f" line {node.start_mark.line + 1} ({shown(node.value)})"
    return ""


def canonical_key(key: str) -> str:
    """``max-cloud`` / ``Max_Cloud`` -> ``max_cloud`` (the RunConfig spelling)."""
    return key.strip().lower().replace("-", "_")


def _suggest(key: str) -> str:
    hint = difflib.get_close_matches(key, VALID_KEYS, n=1, cutoff=0.6)
    return f"{shown(key)} (did you mean {shown(hint[0])}?)" if hint else repr(key)


def load_run_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and check a YAML run file; return its values keyed by canonical (underscore) field name.

    Checked here: YAML syntax (with the line), that the document is a mapping, that every key is known (with
    a did-you-mean), no key given twice (also as ``a-b`` and ``a_b``), the ``window`` grammar, and that
    ``window`` and ``start``/``end`` are not both set. Values are otherwise validated by
    :meth:`RunConfig.create` once merged with the CLI flags (:func:`merge`, :func:`to_run_config`). ``null``
    values are dropped (= not set).
    """
    where = f"config file {cut(os.fspath(path))}"
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read(MAX_RUN_FILE + 1)
    except FileNotFoundError:
        raise InputError(f"{where} does not exist; give --config the path of a YAML run file") from None
    except IsADirectoryError:
        raise InputError(f"{where} is a directory; give --config the path of a YAML run file") from None
    except PermissionError:
        raise InputError(f"{where} cannot be read (permission denied); make it readable or copy it") from None
    except UnicodeDecodeError as exc:
        raise InputError(f"{where} is not UTF-8 text ({exc.reason}); save it as UTF-8 YAML") from None
    except (OSError, ValueError) as exc:  # name too long, a loop of links, an embedded NUL, ...
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        raise InputError(f"{where} cannot be opened ({why}); give --config the path of a YAML run file") from None
    if len(text) > MAX_RUN_FILE:
        raise InputError(
            f"{where} is larger than {MAX_RUN_FILE // 1024} KiB; expected a short YAML run file of 'field: value' "
            "lines (is it the right file?)"
        )
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader subclass: no objects, no aliases
    except _AliasRefused as exc:
        line = exc.problem_mark.line + 1 if exc.problem_mark is not None else "?"
        raise InputError(
            f"{where} line {line}: YAML {exc.problem} is not allowed in a run file (aliases can expand to billions "
            "of values); give the value itself, e.g. 'bbox: [1.4, 48.1, 1.6, 48.3]'"
        ) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        at = f" line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise InputError(
            f"{where}{at}: invalid YAML ({problem}); expected 'field: value' lines such as 'period: month'; "
            "fix the syntax there (indentation, a missing ':' or an unclosed quote/bracket)"
        ) from None
    except (ValueError, OverflowError) as exc:  # a YAML timestamp that is no real date, e.g. 2024-02-30
        raise InputError(
            f"{where}{_bad_timestamp(text)}: a value cannot be read ({exc}); expected real dates as YYYY-MM-DD, "
            "e.g. 'start: 2024-01-31'; fix that value (or quote it)"
        ) from None
    except RecursionError:
        raise InputError(
            f"{where}: invalid YAML (nested too deeply); expected flat 'field: value' lines such as 'period: month'"
        ) from None
    if data is None:
        raise InputError(
            f"{where} is empty; expected a YAML mapping of run fields, e.g. 'bbox: [1.4, 48.1, 1.6, 48.3]'"
        )
    if not isinstance(data, Mapping):
        raise InputError(
            f"{where} holds a {type(data).__name__} ({shown(str(data)[:60])}), not a mapping; expected one "
            "'field: value' per line, e.g. 'period: month'"
        )

    values: dict[str, Any] = {}
    spelled: dict[str, str] = {}
    unknown: list[str] = []
    for raw_key, value in data.items():
        if not isinstance(raw_key, str):
            raise InputError(
                f"{where}: field name {shown(raw_key)} is not text; expected field names such as "
                f"{', '.join(VALID_KEYS[:4])}"
            )
        key = canonical_key(raw_key)
        if key not in VALID_KEYS:
            unknown.append(_suggest(raw_key.strip()))
            continue
        if key in spelled:
            raise InputError(
                f"{where}: field {key} is given twice (as {shown(spelled[key])} and {shown(raw_key)}); keep one of them"
            )
        spelled[key] = raw_key
        if value is not None:
            values[key] = value
    if unknown:
        raise InputError(
            f"{where}: unknown field(s) {', '.join(unknown)}; valid fields are {', '.join(VALID_KEYS)} "
            "(dashes or underscores)"
        )
    if "window" in values:
        try:
            values["window"] = normalise_window(values["window"])
        except InputError as exc:
            raise InputError(f"{where}: {exc}") from None
        both = [k for k in ("start", "end") if k in values]
        if both:
            raise InputError(
                f"{where}: window {values['window']} and {'/'.join(both)} are both set; give either window: "
                "or start: and end:, not both"
            )
    if "cluster" in values and not isinstance(values["cluster"], str):
        raise InputError(
            f"{where}: cluster {shown(values['cluster'])} is not text; expected threads, local, tcp://host:port, "
            "gateway or kubernetes"
        )
    return values


def _given(value: Any) -> bool:
    # Typer/click hand back an empty tuple for an unused multi-value option: that is "not given", like None.
    return value is not None and not (isinstance(value, list | tuple) and len(value) == 0)


def merge(file_values: Mapping[str, Any], cli_values: Mapping[str, Any]) -> dict[str, Any]:
    """Combine run-file values with CLI values: a CLI value wins unless it is ``None`` (or an empty list).

    The CLI therefore has to default every flag to ``None`` (``--overwrite/--no-overwrite`` with
    ``default=None``), or a file's ``overwrite: true`` would be silently replaced by the flag's ``False``.

    ``window`` and ``start``/``end`` replace each other: a CLI ``--start``/``--end`` drops the file's
    ``window`` (a backfill with the scheduled job's file), a CLI ``--window`` drops the file's
    ``start``/``end``. Giving a window and a date on the command line together is an error. Keys are
    canonicalised (``max-cloud`` -> ``max_cloud``); CLI keys are not checked against :data:`VALID_KEYS` (the
    CLI owns its own options).
    """
    result = {canonical_key(k): v for k, v in file_values.items()}
    given = {canonical_key(k): v for k, v in cli_values.items() if _given(v)}
    dates = [k for k in ("start", "end") if k in given]
    if "window" in given:
        if dates:
            raise InputError(
                f"--window {given['window']} and --{'/--'.join(dates)} are both given; give either --window "
                "or --start and --end"
            )
        given["window"] = normalise_window(given["window"])
        result.pop("start", None)
        result.pop("end", None)
    elif dates:
        result.pop("window", None)
    result.update(given)
    return result


def apply_window(values: Mapping[str, Any], today: dt.date | None = None) -> dict[str, Any]:
    """Replace a ``window`` key by the ``start``/``end`` it resolves to against ``today`` (default: UTC)."""
    out = dict(values)
    window = out.pop("window", None)
    if window is None:
        return out
    both = [k for k in ("start", "end") if out.get(k) is not None]
    if both:
        raise InputError(f"window {window} and {'/'.join(both)} are both set; give either a window or start and end")
    out["start"], out["end"] = resolve_window(window, today)
    return out


def to_run_config(values: Mapping[str, Any], today: dt.date | None = None) -> RunConfig:
    """Resolve the window and build a validated :class:`RunConfig` (runtime keys like cluster are ignored)."""
    resolved = apply_window(values, today)
    return RunConfig.create(**{k: v for k, v in resolved.items() if k in RUN_CONFIG_KEYS})


def run_config_from(
    path: str | os.PathLike[str] | None,
    cli_values: Mapping[str, Any] | None = None,
    today: dt.date | None = None,
) -> tuple[RunConfig, dict[str, Any]]:
    """One call for the CLI: load ``path`` (if any), merge the CLI values, return ``(RunConfig, merged)``.

    ``merged`` keeps the runtime keys (``cluster``) for the caller, with the window already resolved.
    """
    file_values = load_run_file(path) if path is not None else {}
    merged = apply_window(merge(file_values, cli_values or {}), today)
    return to_run_config(merged), merged
