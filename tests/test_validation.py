"""The input validation catalogue: whatever a user types, either a valid value or ONE InputError naming the field,
the bad value and the fix; through the CLI, one ``error:`` line, a non-zero exit code, no traceback, nothing written.

Property-based (hypothesis) for the validators, run files and the CLI (in-process, typer's CliRunner); plus a
short parametrised set of real ``python -m ndvi_scale compute`` processes.
"""

from __future__ import annotations

import datetime as dt
import math
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from ndvi_scale.cli import app
from ndvi_scale.config import (
    DEFAULT_MASK_CLASSES,
    MAX_CHUNK,
    METHODS,
    PERIODS,
    BBox,
    RunConfig,
    format_bbox,
    normalise_crs,
    normalise_mask_classes,
    normalise_method,
    normalise_period,
    parse_date,
)
from ndvi_scale.errors import MAX_LINE, MAX_QUOTED, InputError, shown
from ndvi_scale.runfile import VALID_KEYS, load_run_file, run_config_from

OK: dict[str, Any] = dict(bbox=(1.4, 48.1, 1.6, 48.3), start="2024-01-01", end="2024-02-29")
#: Words that introduce the fix in our messages.
FIX = re.compile(r"expected|give |e\.g\.|choose|split it|use |keep |valid fields are|pass |fix ")

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Anything a YAML file, a notebook or a command line could hand over.
anything = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**400), max_value=10**400),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.lists(st.one_of(st.integers(-300, 300), st.floats(), st.text(max_size=5)), max_size=6),
    st.dictionaries(st.text(max_size=4), st.integers(), max_size=3),
    st.dates(),
)


def _check_message(exc: InputError, *needles: str) -> str:
    msg = str(exc)
    for needle in needles:
        assert needle in msg, (needle, msg)
    assert FIX.search(msg), f"no fix offered: {msg}"
    return msg


# ----------------------------------------------------------------------------------------------------- bbox

coord = st.one_of(
    st.floats(-200, 200),
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(min_value=-(10**400), max_value=10**400),
    st.sampled_from([-180.0, 180.0, -90.0, 90.0, 0.0, 179.5, -179.5]),
    st.text(max_size=6),
)


@SETTINGS
@given(
    st.one_of(
        st.tuples(coord, coord, coord, coord),
        st.lists(coord, max_size=6),
        st.tuples(st.floats(-180, 180), st.floats(-90, 90), st.floats(-180, 180), st.floats(-90, 90)),
        st.text(max_size=40),
        anything,
    )
)
def test_bbox_is_valid_or_named(value: Any) -> None:
    try:
        b = format_bbox(value)
    except InputError as e:
        msg = _check_message(e, "bbox")
        if isinstance(value, tuple) and all(isinstance(v, float) for v in value):
            w, s, e_, n = value
            if -180 <= e_ < 0 < w <= 180 and w - e_ > 180 and -90 <= s < n <= 90:
                assert "crosses the antimeridian" in msg and "split it into two runs" in msg or "give it as" in msg
        return
    assert isinstance(b, BBox)
    assert all(math.isfinite(v) for v in b.as_tuple())
    assert -180 <= b.west < b.east <= 180 and -90 <= b.south < b.north <= 90
    assert RunConfig.create(**{**OK, "bbox": value}).bbox == b


# ---------------------------------------------------------------------------------------- dates and names


@SETTINGS
@given(st.sampled_from(["start", "end"]), st.one_of(st.text(max_size=25), anything, st.datetimes()))
def test_dates_are_valid_or_named(name: str, value: Any) -> None:
    try:
        d = parse_date(value, name=name)
    except InputError as e:
        _check_message(e, f"{name} {shown(value)}", "YYYY-MM-DD")
        return
    assert type(d) is dt.date
    if isinstance(value, str):
        assert d == dt.date.fromisoformat(value.strip())


@SETTINGS
@given(st.one_of(st.text(max_size=12), st.sampled_from([*PERIODS, " Month ", "DEKAD"]), anything))
def test_periods(value: Any) -> None:
    try:
        p = normalise_period(value)
    except InputError as e:
        _check_message(e, f"period {shown(value)}", "one of day, week")
        return
    assert p in PERIODS


@SETTINGS
@given(
    st.one_of(
        st.text(max_size=6),
        st.sampled_from([*METHODS, "MEDIAN", " max "]),
        st.integers(-5, 150).map(lambda n: f"q{n}"),
        st.integers(0, 9).map(lambda n: f"q0{n}"),
        anything,
    )
)
def test_methods(value: Any) -> None:
    m_ = re.fullmatch(r"q(\d{1,2})", str(value).strip().lower())
    try:
        m = normalise_method(value)
    except InputError as e:
        _check_message(e, f"method {shown(value)}", "percentile like q25")
        assert not (m_ and 1 <= int(m_.group(1)) <= 99)
        return
    if m_:
        assert 1 <= int(m_.group(1)) <= 99 and m == f"q{int(m_.group(1)):02d}"
    else:
        assert m in METHODS


@SETTINGS
@given(
    st.one_of(
        st.lists(st.integers(-20, 30), max_size=8),
        st.lists(st.integers(0, 11), min_size=1, max_size=8).map(lambda v: ",".join(map(str, v))),
        st.text(max_size=12),
        st.lists(st.floats(allow_nan=True, allow_infinity=True), max_size=4),
        anything,
    )
)
def test_mask_classes(value: Any) -> None:
    try:
        classes = normalise_mask_classes(value)
    except InputError as e:
        _check_message(e, "mask classes", "0-11")
        return
    assert classes == tuple(sorted(set(classes))) and all(0 <= c <= 11 for c in classes)
    assert all(type(c) is int for c in classes)


@SETTINGS
@given(st.one_of(st.integers(-100, 70000), st.integers(0, 4000).map(lambda n: n * 16), anything))
def test_chunk(value: Any) -> None:
    try:
        cfg = RunConfig.create(**OK, chunk=value)
    except InputError as e:
        _check_message(e, "chunk", "multiple of 16")
        if type(value) is int and 64 <= value <= MAX_CHUNK:
            assert value % 16
        return
    assert type(cfg.chunk) is int and 64 <= cfg.chunk <= MAX_CHUNK and cfg.chunk % 16 == 0
    assert not isinstance(value, bool)


@SETTINGS
@given(st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-10, 20000), anything))
def test_resolution_and_max_cloud(value: Any) -> None:
    for field, lo, hi, fix in (("resolution", 0.0, 10000.0, "metres"), ("max_cloud", 0.0, 100.0, "percentage")):
        try:
            cfg = RunConfig.create(**OK, **{field: value})
        except InputError as e:
            _check_message(e, field, fix)
            continue
        got = getattr(cfg, field)
        assert math.isfinite(got) and lo <= got <= hi and (field != "resolution" or got > 0)


@settings(max_examples=100, deadline=None)
@given(
    st.one_of(
        st.text(max_size=12),
        st.integers(0, 99999).map(lambda n: f"EPSG:{n}"),
        st.sampled_from(["auto", "AUTO", " epsg:32631 ", "32631", "EPSG:4326", "EPSG:3857", "EPSG:2263", "utm"]),
        anything,
    )
)
def test_crs(value: Any) -> None:
    try:
        crs = normalise_crs(value)
    except InputError as e:
        _check_message(e, f"crs {shown(value)}", "EPSG:32631")
        return
    assert crs == "auto" or re.fullmatch(r"EPSG:\d{4,5}", crs)
    if crs != "auto":
        from pyproj import CRS

        c = CRS.from_user_input(crs)
        assert c.is_projected and c.axis_info[0].unit_name in ("metre", "meter")


@SETTINGS
@given(st.one_of(st.text(alphabet=" \t\n\r\x0b\x0c", max_size=5), st.integers(), st.lists(st.text(max_size=3))))
def test_out_empty_or_not_text(value: Any) -> None:
    with pytest.raises(InputError) as e:
        RunConfig.create(**OK, out=value)
    _check_message(e.value, "out ", "give a local path")


huge = st.one_of(
    st.integers(81, 10**5).map(lambda n: "m" * n),
    st.integers(81, 10**4).map(lambda n: [1.5] * n),
    st.integers(2, 12).map(lambda depth: __import__("functools").reduce(lambda v, _: [v] * 10, range(depth), 7)),
    st.integers(81, 3000).map(lambda n: {str(i): i for i in range(n)}),
    st.just(10**4000),
)


@SETTINGS
@given(st.sampled_from([f for f in VALID_KEYS if f not in ("window", "cluster")]), st.one_of(anything, huge))
def test_any_field_any_value(field: str, value: Any) -> None:
    """Whatever goes into any field: a RunConfig, or an InputError naming that field (never another exception),
    short whatever the size of the value (a quoted value is cut to 80 characters)."""
    try:
        RunConfig.create(**{**OK, field: value})
    except InputError as e:
        msg = str(e)
        assert field in msg or field.replace("_", " ") in msg, msg
        assert FIX.search(msg), msg
        assert len(msg) <= MAX_LINE, msg


def test_quoted_values_are_cut_with_an_ellipsis() -> None:
    with pytest.raises(InputError) as e:
        RunConfig.create(**OK, method="z" * 20_000_000)
    msg = str(e.value)
    assert "'" + "z" * 70 in msg and "z" * 90 not in msg and "…" in msg and len(msg) < 200, msg
    assert shown("a" * 500) == shown("a" * 10**7) and len(shown("a" * 500)) == MAX_QUOTED
    assert len(shown([[list(range(10**4))] * 10**3] * 10**3)) <= MAX_QUOTED  # nested: bounded cost and length


def alias_bomb(field: str) -> str:
    """A "billion laughs" as the value of ``field``: 9 levels of 9 aliases, 9**9 = 387 million leaves from
    ~300 bytes."""
    lines = [f"{field}:", '  - &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    lines += [f"  - &a{i} [{','.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)]
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("field", list(VALID_KEYS))
def test_yaml_alias_bomb_is_refused_fast_and_small(yaml_dir: Path, field: str) -> None:
    import time
    import tracemalloc

    path = yaml_dir / f"bomb-{field}.yaml"
    path.write_text(alias_bomb(field), encoding="utf-8")
    assert len(path.read_bytes()) < 512
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        with pytest.raises(InputError) as e:
            run_config_from(path, dict(OK))
    finally:
        took = time.perf_counter() - t0
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert took < 1.0 and peak < 100 * 2**20, (took, peak)
    msg = str(e.value)
    assert "line 3: YAML alias *a0 is not allowed in a run file" in msg and len(msg) <= MAX_LINE, msg
    assert FIX.search(msg), msg


def test_long_config_path_is_one_line(tmp_path: Path) -> None:
    for path in ("/tmp/" + "p" * 5000 + ".yaml", str(tmp_path / ("d" * 300)) + "/run.yaml", "nul\x00byte.yaml"):
        with pytest.raises(InputError) as e:
            load_run_file(path)
        msg = str(e.value)
        assert msg.startswith("config file ") and "…" in msg or len(path) < 80, msg
        assert len(msg) <= MAX_LINE and FIX.search(msg), msg
    big = tmp_path / "big.yaml"
    big.write_text("method: " + "m" * 300_000 + "\n")
    with pytest.raises(InputError, match="larger than 256 KiB"):
        load_run_file(big)
    long_value = tmp_path / "long-value.yaml"
    long_value.write_text("method: " + "m" * 100_000 + "\n")
    with pytest.raises(InputError) as e:
        run_config_from(long_value, dict(OK))
    assert "method 'mmm" in str(e.value) and len(str(e.value)) <= MAX_LINE


# ------------------------------------------------------------------------------------------------ run files

yaml_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(10**20), 10**20), st.floats(allow_nan=False), st.text(max_size=12),
    st.dates(),
)
yaml_values = st.recursive(
    yaml_scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=12,
)


@pytest.fixture(scope="module")
def yaml_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("run-files")


def _load_and_build(path: Path) -> None:
    """load_run_file + merge with valid CLI values + RunConfig: only InputError may escape."""
    try:
        values = load_run_file(path)
    except InputError as e:
        assert f"config file {path}" in str(e) and FIX.search(str(e)), str(e)
        return
    assert isinstance(values, dict) and set(values) <= set(VALID_KEYS)
    try:
        run_config_from(path, {k: v for k, v in OK.items() if k not in values and "window" not in values},
                        today=dt.date(2024, 6, 15))
    except InputError as e:
        assert FIX.search(str(e)), str(e)


@SETTINGS
@given(text=st.text(max_size=80))
def test_run_file_random_text(yaml_dir: Path, text: str) -> None:
    path = yaml_dir / "random.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    _load_and_build(path)


@SETTINGS
@given(doc=st.one_of(yaml_values, st.dictionaries(st.sampled_from([*VALID_KEYS, "Max-Cloud", "colour"]), yaml_values)))
def test_run_file_random_documents(yaml_dir: Path, doc: Any) -> None:
    path = yaml_dir / "doc.yaml"
    path.write_text(yaml.safe_dump(doc), encoding="utf-8")
    _load_and_build(path)


@pytest.mark.parametrize(
    ("text", "needles"),
    [
        ("start: 2024-02-30\n", ["line 1", "'2024-02-30'", "YYYY-MM-DD"]),
        ("end: 0000-01-01\n", ["line 1", "'0000-01-01'"]),
        ("period: month\nend: 2024-13-01 10:00:00\n", ["line 2", "'2024-13-01 10:00:00'"]),
        ("bbox: " + "[" * 3000 + "]" * 3000 + "\n", ["nested too deeply"]),
        ("chunk: .inf\n", ["chunk inf is not an integer"]),
        ("bbox: [1e400, 48, 2, 49]\n", ["bbox"]),
    ],
    ids=["feb-30", "year-0", "month-13", "deep", "inf-chunk", "huge-bbox"],
)
def test_run_file_values_yaml_cannot_build(yaml_dir: Path, text: str, needles: list[str]) -> None:
    path = yaml_dir / "bad.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(InputError) as e:
        run_config_from(path, {"start": "2024-01-01", "end": "2024-01-31", "bbox": (1, 48, 2, 49)} if "bbox" not in
                        text else {"start": "2024-01-01", "end": "2024-01-31"})
    for needle in needles:
        assert needle in str(e.value), str(e.value)


# ------------------------------------------------------------------------------------- CLI, in process (hypothesis)

runner = CliRunner()

FLAGS = ("--start", "--end", "--window", "--period", "--method", "--mask-classes", "--chunk", "--resolution",
         "--crs", "--max-cloud", "--zarr-format", "--catalog", "--bbox")


@pytest.fixture(scope="module")
def taken_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An output that exists (a foreign folder): a valid invocation stops there (exit 7), before any search."""
    out = tmp_path_factory.mktemp("cli") / "taken.zarr"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    return out


# Values of any length: long ones must still give a short line (every quoted value is cut, issue K).
long_text = st.one_of(
    st.text(max_size=12),
    st.tuples(st.text(min_size=1, max_size=6), st.integers(20, 4000)).map(lambda t: t[0] * t[1]),
    st.integers(50, 3000).map(lambda n: "9" * n),
    st.integers(50, 3000).map(lambda n: "https://user:pw@h/" + "a" * n + "?k=SECRET"),
)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(flag=st.sampled_from(FLAGS), value=long_text, extra=st.lists(st.text(max_size=8), max_size=3))
def test_cli_any_option_value_is_one_line(taken_out: Path, flag: str, value: str, extra: list[str]) -> None:
    assume("\x00" not in value and all("\x00" not in x for x in extra))
    args = {"--bbox": ["1.4", "48.1", "1.6", "48.3"], "--start": ["2024-01-01"], "--end": ["2024-01-31"],
            "--catalog": [str(taken_out / "no-such-items.json")], "--out": [str(taken_out)]}
    args[flag] = [value, *extra[:3]] if flag == "--bbox" else [value]
    if flag == "--window":
        del args["--start"], args["--end"]
    argv = ["compute", *(a for k, v in args.items() for a in (k, *v))]
    r = runner.invoke(app, argv, env={"NDVI_SCALE_DEBUG": None})
    assert r.exit_code not in (0, 1), (argv, r.exit_code, r.output)  # 1 = an unexpected error
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), (argv, r.output)
    assert "Traceback" not in r.output and r.stdout == ""
    msg = lines[0]
    assert len(msg) <= MAX_LINE and "SECRET" not in msg, msg
    if r.exit_code == 2 and "--help" not in msg:  # our validation (not click's parser): names the field
        field = flag[2:].replace("-", "_")
        assert any(n in msg for n in (field, field.replace("_", " "), flag, "window")), (argv, msg)
        assert FIX.search(msg), msg
    assert sorted(p.name for p in taken_out.iterdir()) == ["precious.txt"]


# ------------------------------------------------------------------------------- CLI, real processes (~10)


CASES: dict[str, tuple[list[str], list[str]]] = {
    "bbox-not-a-number": (["--bbox", "1.7", "x", "1.9", "48.4"], ["bbox (", "'x'", "e.g. --bbox 1.4 48.1 1.6 48.3"]),
    "bbox-three-values": (["--bbox", "1.7", "48.3", "1.9"], ["extra argument", "--bbox takes exactly 4 numbers"]),
    "impossible-date": (["--start", "2024-02-30"], ["start '2024-02-30' is not a date", "YYYY-MM-DD"]),
    "mask-classes": (["--mask-classes", "3,14"], ["mask classes [14] are not SCL classes", "0-11"]),
    "chunk": (["--chunk", "100"], ["chunk 100 is invalid", "multiple of 16", "e.g. 2048"]),
    "resolution": (["--resolution", "-5"], ["resolution -5 is out of range", "metres > 0"]),
    "crs-geographic": (["--crs", "EPSG:4326"], ["crs 'EPSG:4326' is geographic", "e.g. EPSG:32631"]),
    "out-blank": (["--out", "   "], ["out is empty ('   ')", "give a local path"]),
    "max-cloud": (["--max-cloud", "lots"], ["max_cloud 'lots' is not a number", "percentage 0-100"]),
    "config-bad-date": (["--config", "CONFIG"], ["config file", "line 2 ('2024-13-01')", "YYYY-MM-DD"]),
    "unknown-option": (["--bogus", "1"], ["No such option: --bogus", "compute --help"]),
    "config-path-5000": (["--config", "/tmp/" + "c" * 5000 + ".yaml"], ["config file /tmp/ccc", "…", "YAML run file"]),
    "config-alias-bomb": (["--config", "BOMB"], ["line 3: YAML alias *a0 is not allowed in a run file",
                                                 "give the value itself"]),
    "method-huge": (["--method", "q" * 100_000], ["method 'qqq", "…", "percentile like q25"]),
}


@pytest.fixture(scope="module")
def cli_results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[subprocess.CompletedProcess[str], Path]]:
    """All cases run at once (2 cores: the processes mostly import), each in its own empty working folder."""
    base = tmp_path_factory.mktemp("cli-cases")
    config = base / "run.yaml"
    config.write_text("period: month\nend: 2024-13-01\n", encoding="utf-8")
    bomb = base / "bomb.yaml"
    bomb.write_text(alias_bomb("method"), encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k != "NDVI_SCALE_DEBUG"}

    def one(name: str) -> tuple[subprocess.CompletedProcess[str], Path]:
        cwd = base / name
        cwd.mkdir()
        args = {"--bbox": ["1.7", "48.3", "1.9", "48.4"], "--start": ["2024-04-20"], "--end": ["2024-05-15"],
                "--catalog": [str(base / "no-such-items.json")], "--out": ["out.zarr"]}
        bad, _ = CASES[name]
        args[bad[0]] = [str(config) if a == "CONFIG" else str(bomb) if a == "BOMB" else a for a in bad[1:]]
        if bad[0] == "--config":
            del args["--end"]
        argv = [a for k, v in args.items() for a in (k, *v)]
        r = subprocess.run([sys.executable, "-m", "ndvi_scale", "compute", *argv], capture_output=True, text=True,
                           timeout=300, env=env, cwd=cwd)
        return r, cwd

    with ThreadPoolExecutor(max_workers=4) as pool:
        return dict(zip(CASES, pool.map(one, CASES), strict=True))


@pytest.mark.parametrize("name", list(CASES))
def test_cli_bad_invocation(cli_results: dict[str, tuple[subprocess.CompletedProcess[str], Path]], name: str) -> None:
    r, cwd = cli_results[name]
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert "Traceback" not in r.stdout + r.stderr and r.stdout == "" and len(lines[0]) <= MAX_LINE, lines[0]
    for needle in CASES[name][1]:
        assert needle in lines[0], (needle, lines[0])
    assert list(cwd.iterdir()) == []  # nothing written


def test_defaults_still_validate() -> None:
    cfg = RunConfig.create(**OK)
    assert cfg.mask_classes == DEFAULT_MASK_CLASSES and cfg.crs == "auto" and cfg.chunk == 2048
    assert RunConfig.create(**OK, chunk="2048.0", zarr_format=2.0, resolution="20").chunk == 2048
