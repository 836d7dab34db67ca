"""The CLI reference (ndvi_scale.clidoc) and the README block generated from it: every option of every command's
``--help`` is in the README, the block is what the CLI generates, defaults are shown, ``inspect --no-json``."""

from __future__ import annotations

import datetime as dt
import inspect
import json
import re
from dataclasses import fields
from pathlib import Path

import pytest

import ndvi_scale
from ndvi_scale.clidoc import block_of, command_options, reference
from ndvi_scale.sample import SampleSpec, generate

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
COMMANDS = ("compute", "catalogs", "inspect", "show", "series", "zonal")


def _run(*args: str) -> str:
    """The command's output, run in-process (typer's CliRunner: the real CLI, without a Python start-up each)."""
    from typer.testing import CliRunner

    from ndvi_scale.cli import app

    r = CliRunner().invoke(app, list(args), env={"COLUMNS": "200", "TERM": "dumb"})
    assert r.exit_code == 0, r.output
    return r.stdout


def _help(*args: str) -> str:
    return _run(*args, "--help")


def test_every_command_of_the_cli_is_in_the_reference() -> None:
    listed = set(re.findall(r"^│ (\w+)\s", _help(), flags=re.M)) or set(re.findall(r"^\s+(\w+)\s", _help(), re.M))
    assert set(COMMANDS) <= listed, listed
    block = block_of(README)
    for name in listed & set(COMMANDS):
        assert f"**`ndvi-scale {name}" in block, name


@pytest.mark.parametrize("command", COMMANDS)
def test_every_option_in_help_is_in_the_readme(command: str) -> None:
    shown = set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", _help(command))) - {"--help"}
    assert shown, "no option found in --help"
    block = block_of(README)
    missing = sorted(o for o in shown if f"`{o}`" not in block)
    assert not missing, f"options of '{command} --help' missing from the README's reference: {missing}"


def test_readme_block_is_the_generated_reference() -> None:
    assert block_of(README) == reference(), "README is stale: run python -m ndvi_scale.clidoc README.md"


def test_compute_help_shows_the_defaults() -> None:
    text = re.sub(r"[\s│]+", " ", _help("compute"))
    for default in ("month", "median", "0,1,2,3,8,9,10", "2048", "zstd", "auto", "threads", "no-overwrite"):
        assert re.search(rf"\[default: \(?{re.escape(default)}\)?\]", text), default


def test_compute_docstring_names_every_option() -> None:
    from ndvi_scale.config import RunConfig

    doc = inspect.getdoc(ndvi_scale.compute) or ""
    for f in fields(RunConfig):
        assert f"``{f.name}``" in doc, f.name
    assert "``cluster``" in doc
    import typer

    from ndvi_scale.cli import app

    compute = typer.main.get_command(app).commands["compute"]  # type: ignore[attr-defined]
    for opt in command_options(compute):
        name = opt.lstrip("-").replace("-", "_")
        if name.startswith("no_") or name in ("config", "quicklook", "window"):
            continue  # --no-X is X=False; config/quicklook/window are command-line conveniences
        assert f"``{name}``" in doc, opt


def test_inspect_json_and_no_json(tmp_path: Path) -> None:
    generate(tmp_path, SampleSpec(size=96, blocksize=128, start=dt.date(2024, 5, 1), end=dt.date(2024, 5, 6)))
    src = str(tmp_path / "items.json")
    records = [json.loads(line) for line in _run("inspect", src, "--json").splitlines()]
    lines = _run("inspect", src, "--no-json").splitlines()
    assert len(records) == len(lines) >= 2
    for rec, line in zip(records, lines, strict=True):
        assert line.startswith(rec["id"]) and f"EPSG:{rec['epsg']}" in line
        assert f"baseline {rec['processing_baseline']}" in line
        red = rec["bands"]["red"]
        assert f"red x{red['scale']:g}{float(red['offset']):+g}" in line
        with pytest.raises(ValueError):
            json.loads(line)
