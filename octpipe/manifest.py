"""Ingest manifests: load and validate against ``data_manifests/ingest-manifest.schema.json``.

The schema is the contract; :func:`load_manifest` checks every row against it (columns,
enumerations, patterns) and raises a one-line :class:`~octpipe.errors.OctpipeError`
naming the row and column that break it.
"""

from __future__ import annotations

import csv
import json
import re
from functools import cache
from pathlib import Path

from octpipe.errors import OctpipeError

__all__ = ["MANIFEST_FIELDS", "load_manifest", "manifest_row", "manifest_schema"]

#: Manifest columns, in order (the schema is ``data_manifests/ingest-manifest.schema.json``). ``images`` says how
#: an image input was taken: ``volume`` (a folder of B-scans read as one volume), ``bscan`` (an image file on its
#: own), empty for vendor files and rows that read nothing.
MANIFEST_FIELDS = ("volume_id", "path", "sha256", "format", "images", "series", "shape", "spacing_mm",
                   "spacing_source", "laterality", "status", "error", "seconds")


def manifest_row(**values: object) -> dict[str, object]:
    """A manifest row: every column of :data:`MANIFEST_FIELDS`, empty unless given."""
    row: dict[str, object] = dict.fromkeys(MANIFEST_FIELDS, "")
    row.update(values)
    return row


_SCHEMA_PATH = Path(__file__).resolve().parents[1] / "data_manifests" / "ingest-manifest.schema.json"


@cache
def manifest_schema() -> dict:
    """The manifest row schema (JSON Schema, a subset: enum, pattern, minLength)."""
    if not _SCHEMA_PATH.exists():  # an installed copy without the repository: columns only
        return {"required": list(MANIFEST_FIELDS), "properties": {k: {"type": "string"} for k in MANIFEST_FIELDS}}
    return json.loads(_SCHEMA_PATH.read_text())


def load_manifest(path: str | Path) -> list[dict[str, str]]:
    """Read and validate an ingest manifest CSV.

    A manifest written before a column was added (listed under the schema's
    ``x-octpipe-older-columns``, e.g. one without ``images``) still loads: the missing
    columns read as empty strings, so every row has the current columns.

    Parameters
    ----------
    path : str or Path
        The CSV file.

    Returns
    -------
    list of dict
        One dict per row, keys = the schema's columns in order.

    Raises
    ------
    OctpipeError
        On a missing/extra column or a value that breaks the schema.
    """
    path = Path(path)
    schema = manifest_schema()
    try:
        with open(path, newline="") as fh:
            lines = list(fh)
    except UnicodeDecodeError:
        raise OctpipeError("not a manifest CSV (not text)", path) from None
    except OSError as exc:
        raise OctpipeError(f"cannot read manifest: {exc.strerror or exc}", path) from exc
    skip = next((i for i, line in enumerate(lines) if not line.startswith("#")), len(lines))  # the note on paths
    reader = csv.DictReader(lines[skip:])
    try:
        columns = reader.fieldnames or []
        rows = list(reader)
    except csv.Error as exc:
        raise OctpipeError(f"not a manifest CSV: {exc}", path) from exc
    required = list(schema["required"])
    if list(columns) != required:
        older = next((o for o in schema.get("x-octpipe-older-columns", []) if list(columns) == o["columns"]), None)
        if older is None:
            raise OctpipeError(f"manifest columns {columns} differ from {required}", path)
        rows = [{key: row.get(key) or "" for key in required} for row in rows]
    for number, row in enumerate(rows, start=2 + skip):
        for key, rule in schema["properties"].items():
            value = row.get(key) or ""
            if "enum" in rule and value not in rule["enum"]:
                raise OctpipeError(f"line {number}: {key}={value!r} not one of {rule['enum']}", path)
            if "pattern" in rule and not re.fullmatch(rule["pattern"], value):
                raise OctpipeError(f"line {number}: {key}={value!r} does not match {rule['pattern']}", path)
            if len(value) < rule.get("minLength", 0):
                raise OctpipeError(f"line {number}: {key} is empty", path)
    return rows
