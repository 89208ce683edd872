"""``octpipe phantom``: write a seeded cohort of synthetic retinas in vendor formats."""

from __future__ import annotations

from pathlib import Path

import typer

from octpipe.cli import app, state


def _parse_triple(text: str, name: str, cast: type) -> tuple:
    try:
        values = tuple(cast(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3:
        raise typer.BadParameter(f"{name} needs three comma-separated values, got {text!r}")
    return values


@app.command()
def phantom(
    out: Path = typer.Option(..., "--out", "-o", help="Output folder (created)."),
    n: int = typer.Option(4, "--n", min=1, help="Number of phantoms. Default 4."),
    seed: int = typer.Option(0, "--seed", help="Cohort seed; the same seed gives identical files. Default 0."),
    lesions: str = typer.Option(
        "irf,srf,ped,drusen,hrf", "--lesions",
        help="Lesions of the diseased phantoms: KIND[:COUNT[:RADIUS_MM[:HEIGHT_UM]]],... with KIND in "
             "irf, srf, ped, drusen, hrf; COUNT may be a range 2-5; 'none' for an all-healthy cohort. "
             "Default: one of each kind at default sizes."),
    healthy_fraction: float = typer.Option(0.5, "--healthy-fraction", min=0.0, max=1.0,
                                           help="Fraction of healthy phantoms. Default 0.5."),
    formats: str = typer.Option("vol,dicom,nifti,png", "--formats",
                                help="Comma-separated: vol, dicom, nifti, png. Default all."),
    shape: str = typer.Option("49,496,512", "--shape", help="n_bscans,n_axial,n_ascans. Default 49,496,512."),
    spacing: str = typer.Option("0.12,0.00387,0.0113", "--spacing",
                                help="Spacing in mm: between B-scans, axial, lateral. Default 0.12,0.00387,0.0113."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace existing files."),
) -> None:
    """Write seeded synthetic Spectralis-like volumes with known ILM/BM and lesion masks.

    Example: octpipe phantom -o phantoms --n 4 --formats vol,dicom,nifti,png
    """
    from octpipe.testing.phantom_files import write_cohort
    from octpipe.testing.phantoms import make_cohort, parse_lesion_specs

    try:
        specs = parse_lesion_specs(lesions)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--lesions") from exc
    shape_t = _parse_triple(shape, "--shape", int)
    spacing_t = _parse_triple(spacing, "--spacing", float)
    try:
        cohort = make_cohort(n, seed=seed, lesions=specs, healthy_fraction=healthy_fraction,
                             shape=shape_t, spacing_mm=spacing_t)
        manifest = write_cohort(cohort, out, formats=formats.split(","), overwrite=overwrite,
                                progress=state["progress"])
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    if state["verbosity"] >= 0:
        typer.echo(f"wrote {n} phantoms to {out} (manifest: {manifest})")
