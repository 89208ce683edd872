"""``octpipe layers``: ILM and BM rows of an OCT file, in its own pixel geometry."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from octpipe.cli import app, state
from octpipe.cli.info import SPACING_HELP, spacing_option


@app.command()
def layers(
    file: Path = typer.Argument(..., help="An OCT file (any supported format)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output .npz with ilm, bm (n_bscans, n_ascans) and qc."),
    use_vendor: bool = typer.Option(True, "--use-vendor/--no-use-vendor",
                                    help="Use the device's ILM/BM when present and plausible (the default, as "
                                         "in ingest); --no-use-vendor always runs octpipe's segmentation."),
    series: int = typer.Option(0, "--series", min=0, help="Series of a multi-series file. Default 0."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output."),
    spacing_mm: str = typer.Option(None, "--spacing-mm", help=SPACING_HELP),
) -> None:
    """Find the ILM and Bruch's membrane and write their rows per A-scan.

    Rows are in the source file's own pixel geometry (pixel centres, before any
    downsampling); NaN where nothing was found. The QC flags go into the file too
    (key ``qc``, a JSON string).

    Example: octpipe layers scan.vol -o scan-layers.npz
    """
    import numpy as np

    from octpipe.errors import OctpipeError
    from octpipe.io import read_volume
    from octpipe.preprocess.prepare import segment_source
    from octpipe.volume import override_spacing

    spacing = spacing_option(spacing_mm)
    if out.is_dir():
        raise OctpipeError("is a folder; -o takes the output .npz file", out)
    if out.exists() and not overwrite:
        raise OctpipeError("output exists; pass --overwrite to replace it", out)
    if not file.exists():
        raise OctpipeError("no such file or folder", file)
    vol = read_volume(file, series=series)
    vol = override_spacing(vol, spacing)
    try:
        result, vol = segment_source(vol, use_vendor=use_vendor)  # spacing estimated when the file has none
    except (ValueError, ArithmeticError) as exc:  # an image segmentation cannot work on (too small, no pixel)
        raise OctpipeError(f"cannot segment: {' '.join(str(exc).split())}", file) from None
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp.npz")
    qc = json.dumps(result.qc, default=float)
    np.savez_compressed(tmp, ilm=result.ilm, bm=result.bm, qc=np.array(qc),
                        spacing_mm=np.asarray(vol.spacing_mm, dtype=np.float64),
                        spacing_source=np.array(vol.spacing_source))
    try:
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    if state["verbosity"] >= 0:
        flags = ", ".join(result.qc.get("flags", [])) or "none"
        typer.echo(f"{file.name}: ILM/BM for {result.ilm.shape[0]} B-scans x {result.ilm.shape[1]} A-scans "
                   f"(source {result.qc.get('source', 'octpipe')}; spacing {vol.spacing_source}; QC flags: {flags}) "
                   f"-> {out}")
