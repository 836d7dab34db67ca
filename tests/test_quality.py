"""Static checks are part of the test command: ruff on src/, tests/, benchmarks/ and dev/, mypy on src/."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _tool(name: str) -> list[str]:
    exe = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    assert exe, f"{name} is not installed; pip install -e '.[test]'"
    return [exe]


def test_ruff_is_clean():
    r = subprocess.run([*_tool("ruff"), "check", "src", "tests", "benchmarks", "dev"], cwd=ROOT, capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_mypy_is_clean_on_src():
    r = subprocess.run([*_tool("mypy"), "src"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
