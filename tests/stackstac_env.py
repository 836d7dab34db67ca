"""A Python environment with stackstac 0.5.1 (and the pandas<3 it pins) layered on the test environment.

A fresh venv whose site-packages ends with this environment's (a ``.pth`` that ``site.addsitedir``-s them, so
ndvi-scale's editable install, numpy, rasterio, ... are all seen); pip then installs only stackstac and pandas<3
into the layer, where they come first and shadow the current pandas. Made once per test environment (inside it,
in ``.stackstac-env``), reused while its marker says the same requirements. The layer is made without pip: the pip
that installs into it is the test environment's, seen through the ``.pth`` (so no ``ensurepip`` is needed, which
Debian's python3 lacks without python3-venv; README's dev/bootstrap.py installs pip without it).
"""

from __future__ import annotations

import site
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

REQUIREMENTS = ["stackstac==0.5.1", "pandas<3"]


def stackstac_python() -> Path:
    """The layered environment's python, made if needed (needs the package index: PyPI or its mirror)."""
    root = Path(sys.prefix) / ".stackstac-env"
    python = root / "bin" / "python"
    marker = root / "requirements.txt"
    want = "\n".join([*REQUIREMENTS, "# layout 3: outer site-packages (and pip) by .pth"])
    if python.exists() and marker.exists() and marker.read_text() == want:
        return python
    venv.EnvBuilder(clear=True, with_pip=False).create(root)
    layer = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                                check=True, capture_output=True, text=True).stdout.strip())
    outer = [sysconfig.get_path("purelib"), *site.getsitepackages()]
    lines = "".join(f"import site; site.addsitedir({d!r})\n" for d in dict.fromkeys(outer))
    (layer / "zz_outer_environment.pth").write_text(lines)
    subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *REQUIREMENTS],
        check=True, capture_output=True, text=True, timeout=600,
    )
    marker.write_text(want)
    return python
