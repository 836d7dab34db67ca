"""The interactive HTML view (ndvi_scale.viz_html, ``ndvi-scale show --html``) opened in a real headless
Chromium: the page loads with no script error, the slider's period and the value under the mouse are the cube's,
an incomplete cube says so, and the screenshot is a coloured map, not a blank page."""

from __future__ import annotations

import datetime as dt
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import ndvi_scale
from ndvi_scale import viz
from ndvi_scale.sample import SampleSpec, generate
from ndvi_scale.viz_html import CODE_NODATA, CODE_NOT_COMPUTED, decode, encode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_cubestate import interrupted_cube  # noqa: E402

SPEC = SampleSpec(size=192, blocksize=128, start=dt.date(2024, 4, 20), end=dt.date(2024, 6, 15))


def _chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if found is None:
        pytest.fail("headless Chromium is missing: python3 dev/bootstrap.py --test-tools installs it (Debian chromium)",
                    pytrace=False)
    return found


def browse(page: Path, fragment: str, tmp: Path, screenshot: Path | None = None) -> tuple[str, str]:
    """(DOM after the scripts ran, browser log) of ``page#fragment`` in headless Chromium."""
    args = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-extensions",
            f"--user-data-dir={tmp / 'profile'}", "--enable-logging=stderr", "--v=0", "--virtual-time-budget=10000",
            "--window-size=1000,900"]
    args += [f"--screenshot={screenshot}"] if screenshot else ["--dump-dom"]
    r = subprocess.run([*args, f"{page.as_uri()}#{fragment}"], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "HOME": str(tmp)})
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout, r.stderr


def _console_errors(log: str) -> list[str]:
    return [line for line in log.splitlines() if "CONSOLE" in line and re.search(r"error|uncaught", line, re.I)]


@pytest.fixture(scope="module")
def catalog(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = tmp_path_factory.mktemp("html-sample")
    generate(root, SPEC)
    return str(root / "items.json")


def test_codes_round_trip() -> None:
    v = np.array([[-1.0, -0.2, 0.0, 0.5], [0.9, 1.0, np.nan, 0.333]])
    codes = encode(v, np.array([[True] * 4, [True, True, True, False]]))
    assert codes[1, 2] == CODE_NODATA and codes[1, 3] == CODE_NOT_COMPUTED
    back = decode(codes)
    ok = np.isfinite(v) & (codes <= 250)
    assert np.abs(back[ok] - v[ok]).max() <= 0.004 + 1e-9  # half a step of 0.008
    assert np.isnan(back[~ok]).all()


def test_html_view_in_chromium(catalog: str, tmp_path: Path) -> None:
    out = tmp_path / "c.zarr"
    ndvi_scale.compute(bbox=SPEC.bbox_lonlat(), start="2024-04-20", end="2024-06-15", catalog=catalog, chunk=64,
                       out=str(out))
    page = tmp_path / "view.html"
    msg = viz.show(out, html=page)
    assert msg.startswith(f"wrote {page}: NDVI 3 periods")
    text = page.read_text()
    assert "http://" not in text and "https://" not in text, "the page must be self-contained"

    dom, log = browse(page, "t=1&probe=0.4,0.6", tmp_path)
    assert 'data-state="ready"' in dom and "data-errors" not in dom, dom[:500]
    assert not _console_errors(log), _console_errors(log)
    assert re.search(r'<body[^>]*data-period="1"', dom)
    readout = re.search(r'<div id="readout" data-value="([-0-9.]*)" data-x="([-0-9.]+)" data-y="([-0-9.]+)">([^<]*)',
                        dom)
    assert readout, dom[-1500:]
    value, x, y, words = readout.groups()
    ds = viz.open_cube(out)
    truth = float(ds.ndvi.isel(time=1).sel(x=float(x), y=float(y)).values)  # exact pixel centre: no "nearest"
    assert "2024-05" in words
    if np.isnan(truth):
        assert value == "" and "no clear observation" in words
    else:
        assert abs(float(value) - truth) <= 0.005, (value, truth)

    shot = tmp_path / "shot.png"
    browse(page, "t=2", tmp_path, shot)
    with Image.open(shot) as im:
        px = np.asarray(im.convert("RGB"))
    colours = {tuple(c) for c in px[::4, ::4].reshape(-1, 3)}
    greens = ((px[..., 1].astype(int) - px[..., 0] > 30) & (px[..., 1].astype(int) - px[..., 2] > 30)).mean()
    assert len(colours) > 30 and greens > 0.01, "the screenshot shows no map"


def test_html_view_of_an_incomplete_cube(catalog: str, tmp_path: Path) -> None:
    out = tmp_path / "partial.zarr"
    interrupted_cube(catalog, out, regions=3)
    page = tmp_path / "partial.html"
    viz.show(out, html=page)
    dom, log = browse(page, "t=2&probe=0.5,0.5", tmp_path)
    assert 'data-state="ready"' in dom and "data-errors" not in dom and not _console_errors(log)
    banner = re.search(r'<div id="banner"[^>]*>([^<]*)<', dom)
    assert banner and banner.group(1).startswith("INCOMPLETE CUBE")
    assert "not computed yet" in re.search(r'<div id="readout"[^>]*>([^<]*)<', dom).group(1)  # type: ignore[union-attr]
