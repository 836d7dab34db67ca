"""Offline STAC validation with the real stac-validator: every schema a cube's item declares (and every schema
those reference) is mapped to its copy in tests/data/stac-schemas, so nothing is fetched from the internet.

:func:`validate_raw` checks the RAW JSON as written (not an Item read back through pystac, which migrates fields,
e.g. drops ``proj:epsg``, and so hides errors).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

SCHEMAS = Path(__file__).resolve().parent / "data" / "stac-schemas"
_CORE = "https://schemas.stacspec.org/v1.1.0/item-spec/json-schema/"
_GEOJSON = "https://geojson.org/schema/"


def schema_map() -> dict[str, str]:
    """URL -> local file of every schema the items may need: STAC 1.1.0 item spec, GeoJSON, extensions."""
    out: dict[str, str] = {}
    for path in sorted(SCHEMAS.glob("*.json")):
        doc = json.loads(path.read_text())
        sid = str(doc.get("$id", "")).rstrip("#")
        if sid.startswith("https://schemas.stacspec.org/"):
            out[_CORE + path.name] = str(path)  # one core file ($id "...commonjson") has a typo: key by name
        elif sid:
            out[sid] = str(path)
    for path in sorted((SCHEMAS / "geojson").glob("*.json")):
        out[_GEOJSON + path.name] = str(path)
    # PROJJSON is referenced under two versions by the projection extension releases
    out["https://proj.org/schemas/v0.4/projjson.schema.json"] = str(SCHEMAS / "projjson-v0.7.json")
    return out


def validate_raw(path: str | Path) -> dict[str, Any]:
    """stac-validator's verdict on the file at ``path`` (core item schema + every declared extension), offline."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the package asks to move to stac_valid
        from stac_validator.validate import StacValidate

    validator = StacValidate(str(path), schema_map=schema_map())  # default mode: core and extensions
    validator.run()
    (message,) = validator.message
    return dict(message)


def assert_valid(path: str | Path) -> dict[str, Any]:
    """The raw item at ``path``, after asserting that stac-validator finds it valid against every schema it
    declares (and that each declared extension was checked)."""
    verdict = validate_raw(path)
    assert verdict.get("valid_stac") is True, json.dumps(verdict, indent=1)[:4000]
    raw = json.loads(Path(path).read_text())
    checked = set(verdict.get("schema", []))
    local = schema_map()
    assert local[_CORE + "item.json"] in checked, f"the core item schema was not validated: {verdict}"
    for ext in raw.get("stac_extensions", []):
        assert local.get(ext) in checked, f"{ext} was not validated: {verdict}"
    return dict(raw)
