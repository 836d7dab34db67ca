"""Run files (YAML for ``ndvi-scale compute --config``), CLI overrides and relative date windows."""

from __future__ import annotations

import calendar
import datetime as dt
import textwrap
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ndvi_scale import runfile
from ndvi_scale.config import RunConfig
from ndvi_scale.errors import InputError
from ndvi_scale.runfile import (
    FIXED_WINDOWS,
    VALID_KEYS,
    apply_window,
    load_run_file,
    merge,
    normalise_window,
    resolve_window,
    run_config_from,
    to_run_config,
    utc_today,
)

D = dt.date


def write(tmp_path: Path, text: str, name: str = "run.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------------- loading
def test_load_full_file_with_dashes_and_underscores(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        bbox: [1.4, 48.1, 1.6, 48.3]
        start: 2024-01-01
        end: "2024-03-31"
        catalog: sample
        out: gs://bucket/ndvi.zarr
        period: month
        method: q25
        max-cloud: 60
        mask_classes: [3, 8, 9]
        resolution: 20
        crs: EPSG:32631
        chunk: 1024
        overwrite: false
        Append: true
        skip-bad-assets: yes
        zarr-format: 2
        cluster: local
        """,
    )
    values = load_run_file(path)
    assert values == {
        "bbox": [1.4, 48.1, 1.6, 48.3],
        "start": D(2024, 1, 1),
        "end": "2024-03-31",
        "catalog": "sample",
        "out": "gs://bucket/ndvi.zarr",
        "period": "month",
        "method": "q25",
        "max_cloud": 60,
        "mask_classes": [3, 8, 9],
        "resolution": 20,
        "crs": "EPSG:32631",
        "chunk": 1024,
        "overwrite": False,
        "append": True,
        "skip_bad_assets": True,
        "zarr_format": 2,
        "cluster": "local",
    }
    cfg = to_run_config(values)
    assert cfg.start == D(2024, 1, 1) and cfg.end == D(2024, 3, 31)
    assert cfg.max_cloud == 60.0 and cfg.mask_classes == (3, 8, 9) and cfg.method == "q25"
    assert cfg.append is True and cfg.skip_bad_assets is True and cfg.zarr_format == 2
    assert cfg.bbox.as_tuple() == (1.4, 48.1, 1.6, 48.3)


def test_null_values_mean_not_set(tmp_path: Path) -> None:
    values = load_run_file(write(tmp_path, "bbox: 1.4,48.1,1.6,48.3\nout:\nmethod: null\nwindow: previous-month\n"))
    assert values == {"bbox": "1.4,48.1,1.6,48.3", "window": "previous-month"}
    cfg = to_run_config(values, today=D(2024, 3, 1))
    assert (cfg.start, cfg.end, cfg.out, cfg.method) == (D(2024, 2, 1), D(2024, 2, 29), None, "median")


def test_window_is_normalised_when_loaded(tmp_path: Path) -> None:
    assert load_run_file(write(tmp_path, "window: Previous_Month\n"))["window"] == "previous-month"
    assert load_run_file(write(tmp_path, "window: last 30 days\n"))["window"] == "last-30-days"


def test_valid_keys_cover_runconfig() -> None:
    fields = set(RunConfig.__dataclass_fields__) - {"extra"}
    assert fields <= set(VALID_KEYS)
    assert set(VALID_KEYS) - fields == {"window", "cluster"}


# ------------------------------------------------------------------------------------------- load errors
def test_unknown_key_lists_valid_keys_with_did_you_mean(tmp_path: Path) -> None:
    path = write(tmp_path, "bbox: [1, 2, 3, 4]\nmax-clouds: 20\nfoo: 1\n")
    with pytest.raises(InputError) as err:
        load_run_file(path)
    msg = str(err.value)
    assert str(path) in msg
    assert "unknown field(s) 'max-clouds' (did you mean 'max_cloud'?), 'foo'" in msg
    assert "valid fields are bbox, start, end, catalog" in msg and "window, cluster" in msg


def test_did_you_mean_for_window_key(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"'windw' \(did you mean 'window'\?\)"):
        load_run_file(write(tmp_path, "windw: previous-month\n"))


def test_yaml_syntax_error_names_the_line(tmp_path: Path) -> None:
    path = write(tmp_path, "bbox: [1, 2, 3, 4]\nperiod: month\nmethod: [median\nout: x\n")
    with pytest.raises(InputError) as err:
        load_run_file(path)
    msg = str(err.value)
    assert f"config file {path} line 4" in msg
    assert "invalid YAML" in msg and "fix the syntax" in msg


def test_yaml_bad_indentation_names_the_line(tmp_path: Path) -> None:
    path = write(tmp_path, "bbox: [1, 2, 3, 4]\nperiod: month\n  method: median\n")
    with pytest.raises(InputError, match=r"line 3 column \d+: invalid YAML"):
        load_run_file(path)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("- bbox\n- start\n", "holds a list"),
        ("just a string\n", "holds a str"),
        ("42\n", "holds a int"),
    ],
)
def test_not_a_mapping(tmp_path: Path, text: str, expected: str) -> None:
    with pytest.raises(InputError, match=f"{expected} .*not a mapping; expected one 'field: value' per line"):
        load_run_file(write(tmp_path, text))


@pytest.mark.parametrize("text", ["", "# only a comment\n", "---\n"])
def test_empty_file(tmp_path: Path, text: str) -> None:
    with pytest.raises(InputError, match="is empty; expected a YAML mapping of run fields"):
        load_run_file(write(tmp_path, text))


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"config file .*nope\.yaml does not exist; give --config"):
        load_run_file(tmp_path / "nope.yaml")
    with pytest.raises(InputError, match="is a directory; give --config the path of a YAML run file"):
        load_run_file(tmp_path)


def test_unreadable_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # chmod 0 does not stop root (CI runs as root), so make open() refuse as it would for another user.
    def refuse(*args: object, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(runfile, "open", refuse, raising=False)
    with pytest.raises(InputError, match=r"config file .*run\.yaml cannot be read \(permission denied\)"):
        load_run_file(write(tmp_path, "period: month\n"))


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_bytes(b"catalog: caf\xe9\n")
    with pytest.raises(InputError, match="is not UTF-8 text"):
        load_run_file(path)


def test_duplicate_key(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"line 3 .*key 'period' is given twice \(first on line 1\)"):
        load_run_file(write(tmp_path, "period: month\nmethod: max\nperiod: year\n"))


def test_duplicate_key_dash_and_underscore(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"field max_cloud is given twice \(as 'max-cloud' and 'max_cloud'\)"):
        load_run_file(write(tmp_path, "max-cloud: 10\nmax_cloud: 20\n"))


def test_non_text_key(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="field name 1 is not text"):
        load_run_file(write(tmp_path, "1: month\n"))


def test_window_with_start_or_end_in_file(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="window previous-month and start/end are both set; give either window"):
        load_run_file(write(tmp_path, "window: previous-month\nstart: 2024-01-01\nend: 2024-01-31\n"))
    with pytest.raises(InputError, match="window last-7-days and end are both set"):
        load_run_file(write(tmp_path, "window: last-7-days\nend: 2024-01-31\n"))


def test_bad_window_in_file_names_file_and_window(tmp_path: Path) -> None:
    path = write(tmp_path, "window: previous-mnth\n")
    with pytest.raises(InputError) as err:
        load_run_file(path)
    msg = str(err.value)
    assert str(path) in msg and "window 'previous-mnth' is unknown (did you mean 'previous-month'?)" in msg
    assert "expected one of previous-day, previous-week" in msg


def test_cluster_must_be_text(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"cluster \[1, 2\] is not text; expected threads, local"):
        load_run_file(write(tmp_path, "cluster: [1, 2]\n"))


def test_values_are_validated_by_runconfig(tmp_path: Path) -> None:
    values = load_run_file(
        write(tmp_path, "bbox: [1, 2, 3, 4]\nstart: 2024-01-01\nend: 2024-01-31\nperiod: fortnight\n")
    )
    with pytest.raises(InputError, match="period 'fortnight' is unknown"):
        to_run_config(values)


# ---------------------------------------------------------------------------------------------- merging
def test_cli_wins_unless_none() -> None:
    file_values = {"period": "month", "method": "median", "overwrite": True, "max_cloud": 50}
    cli = {"period": "year", "method": None, "overwrite": None, "max-cloud": 10, "mask_classes": ()}
    assert merge(file_values, cli) == {
        "period": "year",
        "method": "median",
        "overwrite": True,
        "max_cloud": 10,
    }


def test_cli_false_flag_overrides_file_true() -> None:
    assert merge({"overwrite": True}, {"overwrite": False}) == {"overwrite": False}


def test_cli_dates_replace_file_window() -> None:
    merged = merge({"window": "previous-month", "bbox": "1,2,3,4"}, {"start": "2023-01-01", "end": "2023-12-31"})
    assert merged == {"bbox": "1,2,3,4", "start": "2023-01-01", "end": "2023-12-31"}
    cfg = to_run_config(merged)
    assert (cfg.start, cfg.end) == (D(2023, 1, 1), D(2023, 12, 31))


def test_cli_start_only_replaces_window_and_then_end_is_missing() -> None:
    merged = merge({"window": "previous-month", "bbox": "1,2,3,4"}, {"start": "2023-01-01"})
    with pytest.raises(InputError, match="end is missing; give --end YYYY-MM-DD"):
        to_run_config(merged)


def test_cli_window_replaces_file_dates() -> None:
    merged = merge({"start": "2024-01-01", "end": "2024-01-31"}, {"window": "previous_year"})
    assert merged == {"window": "previous-year"}
    assert apply_window(merged, D(2025, 6, 1)) == {"start": D(2024, 1, 1), "end": D(2024, 12, 31)}


def test_cli_window_and_dates_together_is_an_error() -> None:
    with pytest.raises(InputError, match="--window previous-month and --start are both given"):
        merge({}, {"window": "previous-month", "start": "2024-01-01"})


def test_apply_window_refuses_window_with_dates() -> None:
    with pytest.raises(InputError, match="window previous-month and start/end are both set"):
        apply_window({"window": "previous-month", "start": "2024-01-01", "end": "2024-01-31"}, D(2024, 3, 1))


def test_run_config_from_file_and_cli(tmp_path: Path) -> None:
    path = write(tmp_path, "bbox: [1.4, 48.1, 1.6, 48.3]\nwindow: previous-month\nappend: true\ncluster: local\n")
    cfg, merged = run_config_from(path, {"method": "max", "out": None}, today=D(2025, 1, 5))
    assert (cfg.start, cfg.end, cfg.method, cfg.append) == (D(2024, 12, 1), D(2024, 12, 31), "max", True)
    assert merged["cluster"] == "local" and "window" not in merged
    cfg2, _ = run_config_from(None, {"bbox": [0, 0, 1, 1], "start": "2024-01-01", "end": "2024-01-02"})
    assert cfg2.end == D(2024, 1, 2)


# ---------------------------------------------------------------------------------------------- windows
@pytest.mark.parametrize(
    ("window", "today", "start", "end"),
    [
        ("previous-month", D(2024, 3, 1), D(2024, 2, 1), D(2024, 2, 29)),  # leap February
        ("previous-month", D(2023, 3, 31), D(2023, 2, 1), D(2023, 2, 28)),
        ("previous-month", D(2025, 1, 5), D(2024, 12, 1), D(2024, 12, 31)),  # year boundary
        ("previous-month", D(2025, 1, 1), D(2024, 12, 1), D(2024, 12, 31)),
        ("previous-month", D(2024, 12, 31), D(2024, 11, 1), D(2024, 11, 30)),
        ("previous-dekad", D(2024, 3, 1), D(2024, 2, 21), D(2024, 2, 29)),  # short leap third dekad
        ("previous-dekad", D(2023, 3, 5), D(2023, 2, 21), D(2023, 2, 28)),
        ("previous-dekad", D(2024, 3, 11), D(2024, 3, 1), D(2024, 3, 10)),
        ("previous-dekad", D(2024, 3, 20), D(2024, 3, 1), D(2024, 3, 10)),
        ("previous-dekad", D(2024, 3, 21), D(2024, 3, 11), D(2024, 3, 20)),
        ("previous-dekad", D(2025, 1, 10), D(2024, 12, 21), D(2024, 12, 31)),  # 11-day third dekad
        ("previous-year", D(2025, 1, 1), D(2024, 1, 1), D(2024, 12, 31)),
        ("previous-year", D(2024, 12, 31), D(2023, 1, 1), D(2023, 12, 31)),
        ("previous-week", D(2024, 3, 4), D(2024, 2, 26), D(2024, 3, 3)),  # a Monday
        ("previous-week", D(2024, 3, 3), D(2024, 2, 19), D(2024, 2, 25)),  # a Sunday
        ("previous-week", D(2025, 1, 1), D(2024, 12, 23), D(2024, 12, 29)),
        ("previous-day", D(2024, 3, 1), D(2024, 2, 29), D(2024, 2, 29)),
        ("previous-day", D(2025, 1, 1), D(2024, 12, 31), D(2024, 12, 31)),
        ("previous-season", D(2024, 3, 1), D(2023, 12, 1), D(2024, 2, 29)),  # DJF across the year, leap
        ("previous-season", D(2025, 1, 15), D(2024, 9, 1), D(2024, 11, 30)),
        ("previous-season", D(2024, 12, 1), D(2024, 9, 1), D(2024, 11, 30)),
        ("previous-season", D(2024, 6, 30), D(2024, 3, 1), D(2024, 5, 31)),
        ("month-to-date", D(2024, 3, 2), D(2024, 3, 1), D(2024, 3, 1)),
        ("month-to-date", D(2024, 2, 29), D(2024, 2, 1), D(2024, 2, 28)),
        ("last-1-days", D(2024, 3, 1), D(2024, 2, 29), D(2024, 2, 29)),
        ("last-30-days", D(2024, 3, 1), D(2024, 1, 31), D(2024, 2, 29)),
        ("last-366-days", D(2025, 1, 1), D(2024, 1, 1), D(2024, 12, 31)),
        ("LAST_7_DAY", D(2025, 1, 3), D(2024, 12, 27), D(2025, 1, 2)),
    ],
)
def test_window_edges(window: str, today: dt.date, start: dt.date, end: dt.date) -> None:
    assert resolve_window(window, today) == (start, end)


def test_window_accepts_datetime_today() -> None:
    now = dt.datetime(2024, 3, 1, 23, 59)
    assert resolve_window("previous-month", now) == (D(2024, 2, 1), D(2024, 2, 29))


def test_window_default_today_is_utc() -> None:
    start, end = resolve_window("previous-day")
    assert start == end == utc_today() - dt.timedelta(days=1)
    assert utc_today() == dt.datetime.now(dt.UTC).date()


def test_month_to_date_on_the_first_is_refused() -> None:
    with pytest.raises(InputError, match="month-to-date is empty on 2024-03-01 .* use window: previous-month"):
        resolve_window("month-to-date", D(2024, 3, 1))


@pytest.mark.parametrize(
    ("window", "match"),
    [
        ("last-0-days", "asks for 0 days; expected last-N-days with 1 <= N <= 3660"),
        ("last-5000-days", "asks for 5000 days"),
        ("previous-fortnight", "window 'previous-fortnight' is unknown"),
        ("", "window '' is not a window name"),
        (3, "window 3 is not a window name"),
        ("last-N-days", "window 'last-N-days' is unknown"),
    ],
)
def test_bad_windows(window: object, match: str) -> None:
    with pytest.raises(InputError, match=match):
        normalise_window(window)


def test_window_before_year_one_is_an_input_error() -> None:
    with pytest.raises(InputError, match="cannot be resolved against today=0001-01-01"):
        resolve_window("previous-month", D(1, 1, 1))


def _dekad_start(d: dt.date) -> dt.date:
    return d.replace(day=1 if d.day <= 10 else 11 if d.day <= 20 else 21)


DATES = st.dates(min_value=D(1901, 1, 1), max_value=D(2299, 12, 31))


@given(today=DATES, window=st.sampled_from(FIXED_WINDOWS))
def test_property_windows_are_complete_and_in_the_past(today: dt.date, window: str) -> None:
    if window == "month-to-date" and today.day == 1:
        with pytest.raises(InputError):
            resolve_window(window, today)
        return
    start, end = resolve_window(window, today)
    one = dt.timedelta(days=1)
    assert start <= end < today
    days = (end - start).days + 1
    if window == "previous-day":
        assert start == end == today - one
    elif window == "previous-week":
        assert days == 7 and start.weekday() == 0 and today - end <= dt.timedelta(days=7)
        assert (end + one).weekday() == 0 and end + one <= today < end + dt.timedelta(days=8)
    elif window == "previous-dekad":
        assert start.day in (1, 11, 21) and _dekad_start(end) == start
        assert days == (calendar.monthrange(start.year, start.month)[1] - 20 if start.day == 21 else 10)
        assert end + one == _dekad_start(today)  # the dekad right before today's
    elif window == "previous-month":
        assert start.day == 1 and days == calendar.monthrange(start.year, start.month)[1]
        assert (end + one).day == 1 and (end + one) == today.replace(day=1)
    elif window == "previous-season":
        assert start.day == 1 and start.month in (12, 3, 6, 9) and 90 <= days <= 92
        assert (end + one).month in (12, 3, 6, 9) and (end + one).day == 1 and today - end <= dt.timedelta(92)
    elif window == "previous-year":
        assert (start, end) == (D(today.year - 1, 1, 1), D(today.year - 1, 12, 31))
        assert days == (366 if calendar.isleap(start.year) else 365)
    elif window == "month-to-date":
        assert start == today.replace(day=1) and end == today - one and days == today.day - 1


@given(today=DATES, n=st.integers(min_value=1, max_value=3660))
def test_property_last_n_days(today: dt.date, n: int) -> None:
    start, end = resolve_window(f"last-{n}-days", today)
    assert end == today - dt.timedelta(days=1)
    assert (end - start).days + 1 == n
    assert start <= end < today
