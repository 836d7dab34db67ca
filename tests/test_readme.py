"""The README as a newcomer uses it: two set-up commands (the second is what CI runs), a virtual environment
first, rioxarray imported where ``.rio`` is used, only extras that exist, pictures that exist."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")


def _blocks(lang: str, text: str = README) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", text, flags=re.S)


def test_two_setup_commands_each_in_a_venv_and_ci_runs_the_second() -> None:
    quick = README.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    commands = [b.strip() for b in _blocks("bash", quick)]
    assert len(commands) == 2, commands
    # dev/bootstrap.py: python3 -m venv .venv, or without ensurepip (Debian without python3-venv) pip from its wheel
    # (tests/test_bootstrap.py); --test-tools: the tests' programs besides Python packages
    assert commands[0].startswith("python3 dev/bootstrap.py && . .venv/bin/activate && pip install -e . && ")
    assert commands[1].startswith("python3 dev/bootstrap.py --test-tools && . .venv/bin/activate && pip install -e ")
    assert all("\n" not in cmd for cmd in commands) and (ROOT / "dev" / "bootstrap.py").is_file()
    assert "ndvi-scale compute" in commands[0] and commands[1].endswith("python -m pytest")
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").strip().splitlines()
    assert ci[-1] == commands[1], "the last line of .ci/run must be README command 2, verbatim"


def test_rio_is_used_only_after_importing_rioxarray() -> None:
    for doc in (README, (ROOT / "notebooks" / "README.md").read_text(encoding="utf-8")):
        for block in _blocks("python", doc):
            if ".rio." in block:
                assert "import rioxarray" in block, block


def test_extras_named_in_docs_exist() -> None:
    extras = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    for doc in (README, (ROOT / "notebooks" / "README.md").read_text(encoding="utf-8")):
        for named in re.findall(r"(?:ndvi-scale|-e \"?\.)\[([a-z,-]+)\]", doc):
            for extra in named.split(","):
                assert extra in extras, f"extra [{extra}] in the docs does not exist in pyproject.toml"
def test_pictures_of_the_readme_exist() -> None:
    for path in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", README):
        f = ROOT / path
        assert f.is_file() and f.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
