"""``octpipe info``: what an OCT file holds, without patient identifiers."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from octpipe.cli import app

#: Help text of ``--spacing-mm`` (info, layers, ingest).
SPACING_HELP = ("Pixel spacing Z,Y,X in mm (between B-scans, axial, lateral) instead of the file's, e.g. "
                "0.12,0.0039,0.0113; an empty field keeps the file's value (,0.0039,0.0113). Recorded as "
                "spacing source 'user'.")

#: Help text of ``--images`` (info, ingest).
IMAGES_HELP = ("How the B-scan images of a folder are read: auto (default) = one volume when they have one "
               "size and names numbered in sequence (Image 1..19.tif, bscan_000.png ...), else one per image; "
               "volume = always one volume per folder; bscans = always one per image.")


def spacing_option(text: str | None) -> tuple[float | None, float | None, float | None] | None:
    """Parse a ``--spacing-mm`` value for the command line; a bad value is a usage error.

    Parameters
    ----------
    text : str or None
        ``"Z,Y,X"`` in mm (see :func:`octpipe.volume.parse_spacing`); None or empty = no override.

    Returns
    -------
    tuple of 3 (float or None), or None

    Raises
    ------
    typer.BadParameter
        With the one-line reason (exit code 2).
    """
    from octpipe.volume import parse_spacing

    if text is None or not text.strip():
        return None
    try:
        return parse_spacing(text)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--spacing-mm") from None


def images_option(text: str) -> str:
    """Check an ``--images`` value (auto, volume or bscans); a bad value is a usage error."""
    from octpipe.inputs import IMAGE_MODES

    if text not in IMAGE_MODES:
        raise typer.BadParameter(f"must be one of {', '.join(IMAGE_MODES)}, got {text!r}", param_hint="--images")
    return text


def describe(path: Path, *, format: str | None = None,
             spacing: tuple[float | None, float | None, float | None] | None = None) -> list[dict[str, object]]:
    """One JSON-ready dict per volume in ``path``: format, geometry, layers, intensity range.

    Parameters
    ----------
    path : Path
        An OCT file, or a folder read as one volume of B-scans.
    format : str, optional
        Skip detection and use this format.
    spacing : tuple of 3 (float or None), optional
        The user's spacing (``--spacing-mm``), None fields keeping the file's.
    """
    import numpy as np

    from octpipe.io import detect_format, read_volumes
    from octpipe.volume import override_spacing

    fmt = format or detect_format(path)
    out = []
    for vol in read_volumes(path, format=fmt):
        vol = override_spacing(vol, spacing)
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


def describe_folder(folder: Path, *, images: str = "auto",
                    spacing: tuple[float | None, float | None, float | None] | None = None) -> tuple[
        list[dict[str, object]], str]:
    """Records for a folder of B-scan images, read as ``ingest`` would read it.

    The images directly in ``folder`` (label maps left out) are one volume or
    independent B-scans as :func:`octpipe.pipeline.classify_image_folder` decides (or
    ``images`` forces). Every record gets ``images`` (``"volume"`` or ``"bscan"``) and
    ``images_reason``.

    Returns
    -------
    records : list of dict
        One for a volume, one per image for independent B-scans.
    summary : str
        One line: what the folder holds and why.

    Raises
    ------
    OctpipeError
        The folder holds no B-scan image, or ``images="volume"`` and they cannot be stacked.
    """
    from octpipe.errors import FormatError, OctpipeError
    from octpipe.inputs import discover_inputs

    inputs, rows = discover_inputs([folder], images=images, recursive=False)
    items = [i for i in inputs if i.images]
    failed = [r for r in rows if r["status"] == "failed" and r["format"] == "bscan-folder"]
    if failed:
        raise OctpipeError(str(failed[0]["error"]), folder)
    if not items:
        raise FormatError("no B-scan images (.png, .jpg, .jpeg, .tif, .tiff, .bmp) in the folder", folder)
    records = []
    for item in items:
        for rec in describe(Path(item.path), format=item.format, spacing=spacing):
            rec["images"], rec["images_reason"] = item.images, item.images_reason
            records.append(rec)
    if items[0].images == "volume":
        summary = f"{folder.name}: one volume of {records[0]['shape'][0]} B-scans: {items[0].images_reason}"
    else:
        summary = f"{folder.name}: {len(items)} independent B-scan image(s), one record each: {items[0].images_reason}"
    return records, summary


@app.command()
def info(
    file: Path = typer.Argument(..., help="An OCT file (any supported format) or a folder of B-scan images."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    spacing_mm: str = typer.Option(None, "--spacing-mm", help=SPACING_HELP),
    images: str = typer.Option("auto", "--images", help=IMAGES_HELP),
) -> None:
    """Show format, shape, spacing and its source, laterality, scan pattern, layers and intensity range.

    A folder of B-scan images is one volume when its images have one size and numbered
    names (Image 1..19.tif), else independent B-scans: one record each. No patient
    identifiers are read or shown.

    Example: octpipe info scan.vol --json
    """
    from octpipe.errors import OctpipeError

    spacing = spacing_option(spacing_mm)
    images = images_option(images)
    if not file.exists():
        raise OctpipeError("no such file or folder", file)
    summary = None
    if file.is_dir():
        records, summary = describe_folder(file, images=images, spacing=spacing)
    else:
        records = describe(file, spacing=spacing)
    if as_json:
        typer.echo(json.dumps(records if len(records) > 1 else records[0], indent=2))
        return
    if summary:
        typer.echo(summary)
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
