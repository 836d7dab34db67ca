"""A self-contained interactive HTML view of an NDVI cube (``ndvi-scale show CUBE --html view.html``).

One file, no server, no network: every period is embedded as a grey-level PNG of NDVI *codes* (the browser
decodes it; the page colours it with the palette of :mod:`ndvi_scale.viz` and reads the value under the mouse
from the same codes). A time slider (and the arrow keys) steps through the periods; hovering shows the NDVI, the
period and the x/y of the pixel. An incomplete cube says so, and its regions not computed yet are striped, never
drawn like pixels without a clear observation.

Codes (uint8): ``0..250`` = NDVI ``-1 + code / 125`` (steps of 0.008), :data:`CODE_NODATA` = no clear
observation, :data:`CODE_NOT_COMPUTED` = not computed yet.
"""

from __future__ import annotations

import base64
import html as htmllib
import io
import json
import math
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from .errors import InputError, OutputError, shown

__all__ = ["CODE_NODATA", "CODE_NOT_COMPUTED", "MAX_SIDE", "check_html_path", "decode", "encode", "write_html"]

CODE_NODATA = 251
CODE_NOT_COMPUTED = 252
#: Longest side of the embedded rasters (pixels): every ``step``-th cube pixel is kept (nearest, no averaging,
#: so the value under the mouse is a real pixel of the cube). 1000 keeps a year of monthly frames near 5 MB.
MAX_SIDE = 1000


def encode(ndvi: np.ndarray, computed: np.ndarray | None = None) -> np.ndarray:
    """NDVI (float) -> uint8 codes (see the module docstring)."""
    v = np.asarray(ndvi, dtype=np.float64)
    codes = np.full(v.shape, CODE_NODATA, dtype=np.uint8)
    ok = np.isfinite(v)
    codes[ok] = np.clip(np.rint((np.clip(v[ok], -1.0, 1.0) + 1.0) * 125.0), 0, 250).astype(np.uint8)
    if computed is not None:
        codes[~computed] = CODE_NOT_COMPUTED
    return codes


def decode(codes: np.ndarray) -> np.ndarray:
    """uint8 codes -> NDVI (NaN for both special codes): what the page shows under the mouse."""
    c = np.asarray(codes).astype(np.float64)
    return np.where(c <= 250, c / 125.0 - 1.0, np.nan)


def check_html_path(path: Any) -> Path:
    """Validate an HTML output path before any work: a local ``.html`` file in an existing folder."""
    if not isinstance(path, str | os.PathLike) or not os.fspath(path).strip():
        raise InputError(f"html path {shown(path)} is empty; give a file name ending in .html")
    raw = os.fspath(path)
    if "://" in raw:
        raise InputError(f"html path {shown(raw)} is a URL; the view is written to a local file, e.g. view.html")
    out = Path(raw).expanduser()
    if out.suffix.lower() not in (".html", ".htm"):
        raise InputError(f"html path {shown(raw)} does not end in .html; give a file name like view.html")
    if out.is_dir():
        raise OutputError(f"cannot write {shown(raw)}: it is a folder; give a file name like view.html")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise OutputError(f"cannot write {shown(raw)}: folder {parent} does not exist; create it first")
    return out


def _png_gray(codes: np.ndarray) -> str:
    from PIL import Image  # matplotlib's own dependency

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(codes), mode="L").save(buf, format="PNG", optimize=True)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _lut() -> list[list[int]]:
    """RGB of every code: the NDVI palette (deep water below its range), grey for no data, pink for not computed."""
    from .viz import NDVI_RANGE, NODATA_COLOR, WATER_COLOR, _hex_to_rgb, _rgb_at

    values = np.arange(251) / 125.0 - 1.0
    rgb = _rgb_at(values)
    rgb[values < NDVI_RANGE[0]] = _hex_to_rgb(WATER_COLOR)
    out = [[round(c * 255) for c in row] for row in rgb]
    out.append([round(c * 255) for c in _hex_to_rgb(NODATA_COLOR)])
    out.append([232, 160, 160])
    return out


def write_html(ds: xr.Dataset, path: str | os.PathLike[str], periods: list[int] | None = None,
               title: str | None = None) -> str:
    """Write the interactive view of cube ``ds`` (periods ``periods``, default all) to ``path``; return the path.

    The file's permissions are those the umask gives a new file. Raises :class:`InputError` for a bad path,
    :class:`OutputError` when it cannot be written.
    """
    from .cubestate import completeness
    from .viz import NDVI_RANGE, NDVI_STOPS, _crs_name, _default_title, _labels, _ndvi_array, _requested_span

    out = check_html_path(path)
    arr = _ndvi_array(ds)
    idx = list(range(arr.sizes["time"])) if periods is None else list(periods)
    ny, nx = arr.sizes["y"], arr.sizes["x"]
    step = max(1, math.ceil(max(ny, nx) / MAX_SIDE))
    state = completeness(ds)
    labels = _labels(arr, _requested_span(ds))
    sub = arr.isel(time=idx, y=slice(0, None, step), x=slice(0, None, step))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        values = np.asarray(sub.values, dtype=np.float32)
    frames = []
    for k, i in enumerate(idx):
        done = state.pixel_mask(i, ny, nx)[::step, ::step] if not state.complete else None
        codes = encode(values[k], done)
        finite = np.isfinite(values[k]) & (done if done is not None else True)
        n_done = int(done.sum()) if done is not None else codes.size
        frames.append({
            "label": labels[i],
            "png": _png_gray(codes),
            "clear": round(float(finite.sum()) / n_done, 4) if n_done else 0.0,
            "computed": round(n_done / codes.size, 4),
        })
    xs, ys = sub["x"].values, sub["y"].values
    meta = {
        "title": title or _default_title(ds, arr),
        "crs": _crs_name(ds),
        "x0": float(xs[0]), "dx": float(xs[1] - xs[0]) if len(xs) > 1 else float(step * 10),
        "y0": float(ys[0]), "dy": float(ys[1] - ys[0]) if len(ys) > 1 else -float(step * 10),
        "nx": int(values.shape[2]), "ny": int(values.shape[1]), "step": step,
        "banner": state.banner().replace("drawn hatched", "striped"),
        "lut": _lut(), "range": list(NDVI_RANGE),
        "stops": [[p, c] for p, c in NDVI_STOPS],
        "frames": frames,
    }
    page = _TEMPLATE.replace("__TITLE__", htmllib.escape(str(meta["title"]))).replace(
        "__DATA__", json.dumps(meta, separators=(",", ":")).replace("</", "<\\/"))
    _save_text(page, out)
    return os.fspath(out)


def _save_text(text: str, out: Path) -> None:
    """Write ``text`` beside ``out`` and rename it into place, with the umask's permissions for a new file."""
    from .viz import _umask

    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".html", dir=out.parent if str(out.parent) else ".")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, out)
    except OSError as exc:
        raise OutputError(f"cannot write {out}: {exc.strerror or exc}; choose a writable folder") from None
    finally:
        if "tmp" in locals() and os.path.exists(tmp):
            os.unlink(tmp)


_TEMPLATE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>__TITLE__</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body{font:14px/1.35 system-ui,sans-serif;margin:12px;color:#222;background:#fff}
h1{font-size:17px;margin:0 0 6px}
#banner{display:none;background:#fde8e8;color:#9b1c1c;border:1px solid #9b1c1c;border-radius:4px;padding:4px 8px;
font-weight:bold;margin:4px 0}
#controls{display:flex;gap:12px;align-items:center;margin:6px 0}
#slider{flex:1;max-width:640px}
#view{image-rendering:pixelated;border:1px solid #666;max-width:100%;cursor:crosshair;
background:repeating-linear-gradient(45deg,#fff 0 4px,#e8a0a0 4px 8px)}
#readout{font-family:ui-monospace,monospace;min-height:1.4em}
#legend{display:flex;gap:14px;align-items:center;margin-top:6px;font-size:12px}
.sw{display:inline-block;width:14px;height:14px;border:1px solid #666;vertical-align:middle;margin-right:4px}
</style></head>
<body data-state="loading">
<h1 id="title">__TITLE__</h1>
<div id="banner"></div>
<div id="controls"><input id="slider" type="range" min="0" max="0" value="0" aria-label="period">
<strong id="period"></strong><span id="share"></span></div>
<canvas id="view"></canvas>
<div id="readout">move the mouse over the map</div>
<div id="legend"><canvas id="ramp" width="320" height="14"></canvas><span id="ticks"></span>
<span><span class="sw" style="background:#c8c8c8"></span>no clear observation</span>
<span id="nc" style="display:none"><span class="sw"
style="background:repeating-linear-gradient(45deg,#fff 0 3px,#e8a0a0 3px 6px)"></span>not computed yet</span></div>
<script id="data" type="application/json">__DATA__</script>
<script>
"use strict";
const errors = [];
window.addEventListener("error", e => {
  errors.push(String(e.message)); document.body.dataset.errors = errors.join(" | ");
});
const D = JSON.parse(document.getElementById("data").textContent);
const view = document.getElementById("view"), ctx = view.getContext("2d");
view.width = D.nx; view.height = D.ny;
view.style.width = Math.min(900, Math.max(D.nx, 480)) + "px";
const codes = new Array(D.frames.length), images = new Array(D.frames.length);
let current = 0;
function ndvi(code) { return code <= 250 ? code / 125 - 1 : null; }
function decodeFrame(i) {
  return new Promise((resolve, reject) => {
    const img = new Image();
    img.onload = () => {
      const c = document.createElement("canvas"); c.width = D.nx; c.height = D.ny;
      const g = c.getContext("2d"); g.drawImage(img, 0, 0);
      const px = g.getImageData(0, 0, D.nx, D.ny).data, k = new Uint8Array(D.nx * D.ny);
      const out = ctx.createImageData(D.nx, D.ny);
      for (let p = 0; p < k.length; p++) {
        const code = px[4 * p]; k[p] = code;
        const rgb = D.lut[Math.min(code, D.lut.length - 1)];
        out.data[4 * p] = rgb[0]; out.data[4 * p + 1] = rgb[1]; out.data[4 * p + 2] = rgb[2];
        out.data[4 * p + 3] = code === 252 ? 0 : 255;
      }
      codes[i] = k; images[i] = out; resolve();
    };
    img.onerror = () => reject(new Error("frame " + i + " does not decode"));
    img.src = "data:image/png;base64," + D.frames[i].png;
  });
}
async function show(i) {
  current = i;
  if (!images[i]) await decodeFrame(i);
  ctx.clearRect(0, 0, D.nx, D.ny); ctx.putImageData(images[i], 0, 0);
  const f = D.frames[i];
  document.getElementById("period").textContent = f.label;
  document.getElementById("share").textContent = f.computed < 1 ?
    (f.computed === 0 ? "not computed yet" : Math.round(100 * f.computed) + "% computed") :
    Math.round(100 * f.clear) + "% clear";
  document.getElementById("slider").value = i;
  document.body.dataset.period = String(i);
}
function probe(col, row) {
  col = Math.max(0, Math.min(D.nx - 1, col)); row = Math.max(0, Math.min(D.ny - 1, row));
  const code = codes[current][row * D.nx + col], v = ndvi(code);
  const x = D.x0 + col * D.dx, y = D.y0 + row * D.dy;
  const what = v === null ? (code === 252 ? "not computed yet" : "no clear observation") : "NDVI " + v.toFixed(3);
  const text = what + "  at x=" + x.toFixed(0) + " y=" + y.toFixed(0) + (D.crs ? " (" + D.crs + ")" : "") +
    "  " + D.frames[current].label;
  const r = document.getElementById("readout"); r.textContent = text;
  r.dataset.value = v === null ? "" : v.toFixed(3); r.dataset.x = x; r.dataset.y = y;
  return text;
}
view.addEventListener("mousemove", e => {
  const b = view.getBoundingClientRect();
  probe(Math.floor((e.clientX - b.left) / b.width * D.nx), Math.floor((e.clientY - b.top) / b.height * D.ny));
});
const slider = document.getElementById("slider");
slider.max = D.frames.length - 1;
slider.addEventListener("input", () => show(Number(slider.value)));
document.addEventListener("keydown", e => {
  if (e.key === "ArrowRight") show(Math.min(current + 1, D.frames.length - 1));
  if (e.key === "ArrowLeft") show(Math.max(current - 1, 0));
});
function legend() {
  const c = document.getElementById("ramp"), g = c.getContext("2d"), lo = D.range[0], hi = D.range[1];
  for (let p = 0; p < c.width; p++) {
    const v = lo + (p + 0.5) / c.width * (hi - lo), rgb = D.lut[Math.round((v + 1) * 125)];
    g.fillStyle = "rgb(" + rgb.join(",") + ")"; g.fillRect(p, 0, 1, c.height);
  }
  document.getElementById("ticks").textContent =
    "NDVI " + lo + " .. " + hi + " (blue < 0: water, snow; brown: bare soil; green: vegetation)";
}
(async () => {
  legend();
  if (D.banner) { const b = document.getElementById("banner"); b.textContent = D.banner; b.style.display = "block"; }
  if (D.frames.some(f => f.computed < 1)) document.getElementById("nc").style.display = "inline";
  const q = new URLSearchParams(location.hash.slice(1));
  await show(Math.max(0, Math.min(D.frames.length - 1, Number(q.get("t") || 0))));
  if (q.get("probe")) {
    const [fx, fy] = q.get("probe").split(",").map(Number);
    probe(Math.floor(fx * D.nx), Math.floor(fy * D.ny));
  }
  document.body.dataset.state = "ready";
})().catch(e => { errors.push(String(e)); document.body.dataset.errors = errors.join(" | "); });
</script></body></html>
"""
