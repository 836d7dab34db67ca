"""dev/bootstrap.py, the first step of the README's two set-up commands: a venv with pip where Debian's
python3-venv (ensurepip) is missing, pip from its wheel (sha256 checked), and the tests' programs besides Python.

The missing-ensurepip path runs for real here: a venv made without pip, then a wheel served by a simple index on
127.0.0.1, downloaded, checked and run from itself. The wheel is a small stand-in for pip (no network here) whose
``pip install`` puts a working ``pip`` module into the venv, as the real one does."""

from __future__ import annotations

import hashlib
import http.server
import importlib.util
import subprocess
import sys
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("bootstrap", ROOT / "dev" / "bootstrap.py")
assert spec and spec.loader
bootstrap = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bootstrap)

# Run as `python stand-in.whl/pip install stand-in.whl`, like pip's wheel: copies its own `pip` package into the
# running venv's site-packages, so that `python -m pip --version` works afterwards, and nothing else.
MAIN = '''
import shutil, sys, sysconfig, zipfile
assert sys.argv[1:3] == ["install", "--quiet"] and sys.argv[3] == "--no-index", sys.argv
wheel = sys.argv[4]
assert sys.prefix != sys.base_prefix, "not inside a venv"
with zipfile.ZipFile(wheel) as z:
    z.extractall(sysconfig.get_paths()["purelib"], [n for n in z.namelist() if n.startswith("pip/")])
'''


def _stand_in_wheel(path: Path) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("pip/__init__.py", "")
        z.writestr("pip/__main__.py", "import sys\nif sys.argv[1:] == ['--version']:\n    print('pip stand-in')\n"
                                      "else:\n" + "".join("    " + line + "\n" for line in MAIN.strip().splitlines()))
    return path


@pytest.fixture()
def index(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A simple index on 127.0.0.1 listing the stand-in wheel on its page of pip (with its sha256, as PyPI does)."""
    root = tmp_path / "index"
    (root / "pip").mkdir(parents=True)
    (root / "files").mkdir()
    wheel = _stand_in_wheel(root / "files" / bootstrap.PIP_WHEEL)
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    (root / "pip" / "index.html").write_text(
        f'<a href="../files/pip-0.1-py3-none-any.whl#sha256=0">old</a>\n'
        f'<a href="../files/{wheel.name}#sha256={digest}" data-requires-python="&gt;=3.9">{wheel.name}</a>\n')

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a: Any, **kw: Any) -> None:
            super().__init__(*a, directory=str(root), **kw)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/", wheel
    finally:
        server.shutdown()
        server.server_close()


def test_fetch_checks_the_pinned_sha256(index: tuple[str, Path], tmp_path: Path) -> None:
    url, wheel = index
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    (tmp_path / "a").mkdir()
    got = bootstrap.fetch_pip_wheel(tmp_path / "a", url, sha256=digest)
    assert got.name == bootstrap.PIP_WHEEL and got.read_bytes() == wheel.read_bytes()
    (tmp_path / "b").mkdir()
    with pytest.raises(SystemExit, match=f"has sha256 {digest}, expected {'0' * 64}; not installed"):
        bootstrap.fetch_pip_wheel(tmp_path / "b", url, sha256="0" * 64)
    assert not list((tmp_path / "b").iterdir())
    with pytest.raises(SystemExit, match="pip-9.9-py3-none-any.whl is not listed"):
        bootstrap.fetch_pip_wheel(tmp_path / "b", url, name="pip-9.9-py3-none-any.whl")


def test_without_ensurepip_a_venv_gets_pip_from_the_wheel(index: tuple[str, Path], tmp_path: Path) -> None:
    url, wheel = index
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    env = tmp_path / ".venv"
    said = bootstrap.make_venv(env, ensurepip=False,
                               fetch=lambda dest: bootstrap.fetch_pip_wheel(dest, url, sha256=digest))
    assert "without ensurepip" in said and "python3-venv" in said and "sha256 checked" in said
    py = bootstrap.venv_python(env)
    out = subprocess.run([py, "-c", "import sys, pip; print(sys.prefix != sys.base_prefix, pip.__file__)"],
                         capture_output=True, text=True, check=True).stdout.split()
    assert out[0] == "True" and Path(out[1]).is_relative_to(env)  # pip is the venv's own, not the host's
    assert subprocess.run([py, "-m", "pip", "--version"], capture_output=True, text=True).stdout == "pip stand-in\n"
    # run again (the README command twice): the venv is kept, nothing downloaded
    said = bootstrap.make_venv(env, ensurepip=False, fetch=lambda dest: pytest.fail("downloaded again"))
    assert said.startswith("kept")


def test_with_ensurepip_it_is_python3_m_venv(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    ran: list[list[str]] = []
    monkeypatch.setattr(bootstrap.subprocess, "run", lambda cmd, **kw: ran.append([str(c) for c in cmd]))
    said = bootstrap.make_venv(tmp_path / ".venv", ensurepip=True, fetch=lambda dest: pytest.fail("downloaded"))
    assert ran == [[sys.executable, "-m", "venv", str(tmp_path / ".venv")]] and "python3 -m venv" in said
    assert bootstrap.has_ensurepip() == (importlib.util.find_spec("ensurepip") is not None)


def test_the_pinned_pip_wheel_is_a_universal_wheel() -> None:
    assert bootstrap.PIP_WHEEL.startswith("pip-") and bootstrap.PIP_WHEEL.endswith("-py3-none-any.whl")
    assert len(bootstrap.PIP_SHA256) == 64 and int(bootstrap.PIP_SHA256, 16) >= 0


def test_missing_test_tools(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("NDVI_SCALE_HELM", raising=False)
    monkeypatch.setattr(bootstrap, "ROOT", tmp_path)  # no .cache/tools/helm there
    nothing = bootstrap.missing_test_tools(which=lambda name: None, find_library=lambda name: None)
    assert nothing == (["gdal-bin", "libudunits2-0", "chromium", "npm"], True)
    with_npm = bootstrap.missing_test_tools(which=lambda name: "/usr/bin/npm" if name == "npm" else None,
                                            find_library=lambda name: None)
    assert with_npm == (["gdal-bin", "libudunits2-0", "chromium"], True)
    everything = bootstrap.missing_test_tools(which=lambda name: f"/usr/bin/{name}", find_library=lambda n: "lib.so")
    assert everything == ([], False)
    (tmp_path / ".cache/tools").mkdir(parents=True)
    (tmp_path / ".cache/tools/helm").write_bytes(b"")
    fetched = bootstrap.missing_test_tools(which=lambda name: None if name == "helm" else "/x", find_library=len)
    assert fetched == ([], False)


def test_apt_install_command_uses_sudo_only_when_not_root() -> None:
    present = lambda name: f"/usr/bin/{name}"  # noqa: E731
    assert bootstrap.apt_install_command(["gdal-bin"], 0, present)[:2] == ["apt-get", "install"]
    assert bootstrap.apt_install_command(["gdal-bin"], 1000, present)[:3] == ["sudo", "apt-get", "install"]
    with pytest.raises(SystemExit, match="not root and no sudo"):
        bootstrap.apt_install_command(["gdal-bin"], 1000, lambda name: None if name == "sudo" else "/x")
    with pytest.raises(SystemExit, match="no apt-get here"):
        bootstrap.apt_install_command(["gdal-bin"], 0, lambda name: None)
