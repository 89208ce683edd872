"""``octpipe info``: what an OCT file holds, without patient identifiers."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from octpipe.cli import app


def describe(path: Path) -> list[dict[str, object]]:
    """One JSON-ready dict per volume in ``path``: format, geometry, layers, intensity range."""
    import numpy as np

    from octpipe.io import detect_format, read_volumes

    fmt = detect_format(path)
    out = []
    for vol in read_volumes(path, format=fmt):
        valid = vol.data if vol.invalid is None else vol.data[~vol.invalid]
        finite = valid[np.isfinite(valid)]
        out.append({
            "file": path.name,
            "format": fmt,
            "series": vol.provenance.series if vol.provenance else 0,
            "volume_id": vol.volume_id,
            "shape": list(vol.shape),
            "axes": ["bscan", "axial", "ascan"],
            "spacing_mm": [round(float(s), 7) for s in vol.spacing_mm],
            "spacing_source": vol.spacing_source,
            "laterality": vol.laterality,
            "scan_pattern": vol.scan_pattern,
            "bscan_order": vol.bscan_order,
            "vendor": vol.vendor,
            "intensity": vol.intensity,
            "intensity_range": [float(finite.min()), float(finite.max())] if finite.size else None,
            "invalid_pixels": int(vol.invalid.sum()) if vol.invalid is not None else 0,
            "layers": {name: int(np.isfinite(rows).sum()) for name, rows in vol.layers.items()},
        })
    return out


@app.command()
def info(
    file: Path = typer.Argument(..., help="An OCT file (any supported format) or a folder of B-scan images."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Show format, shape, spacing and its source, laterality, scan pattern, layers and intensity range.

    No patient identifiers are read or shown.

    Example: octpipe info scan.vol --json
    """
    from octpipe.errors import OctpipeError

    if not file.exists():
        raise OctpipeError("no such file or folder", file)
    records = describe(file)
    if as_json:
        typer.echo(json.dumps(records if len(records) > 1 else records[0], indent=2))
        return
    for rec in records:
        typer.echo(f"{rec['file']} (series {rec['series']}): {rec['format']}, vendor {rec['vendor']}")
        z, y, x = rec["shape"]
        typer.echo(f"  shape        {z} B-scans x {y} axial x {x} A-scans")
        sp = rec["spacing_mm"]
        typer.echo(f"  spacing_mm   {sp[0]:g} between B-scans, {sp[1]:g} axial, {sp[2]:g} lateral "
                   f"({rec['spacing_source']})")
        typer.echo(f"  laterality   {rec['laterality'] or 'unknown'};  scan pattern {rec['scan_pattern']};  "
                   f"B-scan order {rec['bscan_order']}")
        rng = rec["intensity_range"]
        typer.echo(f"  intensity    {rec['intensity']}, range {rng[0]:.4g}..{rng[1]:.4g}" if rng else
                   f"  intensity    {rec['intensity']}, no valid pixels")
        if rec["invalid_pixels"]:
            typer.echo(f"  invalid      {rec['invalid_pixels']} pixels marked empty")
        layers = ", ".join(f"{k} ({v} A-scans)" for k, v in rec["layers"].items()) or "none"
        typer.echo(f"  layers       {layers}")
