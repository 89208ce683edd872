"""``octpipe export``: full-volume anomaly maps, overlays, en-face map, DICOM/NIfTI and HTML reports."""

from __future__ import annotations

import math
from pathlib import Path

import typer

from octpipe.cli import app, state
from octpipe.cli.info import IMAGES_HELP, SPACING_HELP, images_option, spacing_option


def check_map_options(weighting: str, device: str, precision: str) -> None:
    """Usage errors for the window-map options that export and calibrate share."""
    from octpipe.heatmap import WEIGHTINGS

    if weighting not in WEIGHTINGS:
        raise typer.BadParameter(f"must be one of {', '.join(WEIGHTINGS)}, got {weighting!r}", param_hint="--weighting")
    if device not in ("auto", "cpu", "cuda"):
        raise typer.BadParameter(f"must be auto, cpu or cuda, got {device!r}", param_hint="--device")
    if precision not in ("auto", "fp32", "tf32", "bf16"):
        raise typer.BadParameter(f"must be auto, fp32, tf32 or bf16, got {precision!r}", param_hint="--precision")


@app.command()
def export(
    source: Path = typer.Argument(..., help="An OCT file (any supported format), a folder of B-scan images or an "
                                            "ingested store (STORE.zarr)."),
    model: Path = typer.Option(..., "--model", help="A trained run (octpipe train) or a bundled model folder, "
                                                    "e.g. models/fanogan-phantom."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder: one sub-folder per volume, index.html and "
                                                       "index.csv."),
    volume: list[str] = typer.Option(None, "--volume", help="For a store: export only this volume id "
                                                             "(repeatable). Default: every complete volume."),
    stride: int = typer.Option(16, "--stride", min=1, help="Window step in pixels. Default 16."),
    weighting: str = typer.Option("gaussian", "--weighting", help="Window merge weights: gaussian (default), "
                                                                  "hann or constant."),
    threshold: float = typer.Option(3.0, "--threshold", help="Residual, in units of the normal RMS residual, "
                                                              "above which voxels are segmented; > 0. Default 3."),
    batch_size: int | None = typer.Option(None, "--batch-size", min=1,
                                            help="Windows per forward pass. Default: 32 for float32 on a "
                                                 "CPU, else 256."),
    device: str = typer.Option("auto", "--device", help="auto (default; CUDA when available), cpu or cuda."),
    precision: str = typer.Option("auto", "--precision", help="auto (default: bf16 on CUDA and on CPUs with "
                                                              "native bf16, else fp32), fp32, tf32 or bf16."),
    workers: int = typer.Option(0, "--workers", min=0, help="For a store: Dask worker processes; 0 (default) "
                                                            "runs in this process."),
    scheduler: str = typer.Option(None, "--scheduler", help="Address of an existing dask.distributed scheduler."),
    source_root: Path = typer.Option(None, "--source-root", help="For a store: the folder it was ingested from, "
                                                                 "so DICOM sources can be referenced."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Redo volumes already exported."),
    spacing_mm: str = typer.Option(None, "--spacing-mm", help=SPACING_HELP + " For files and folders; a store's "
                                                                             "volumes keep their ingested spacing."),
    images: str = typer.Option("auto", "--images", help=IMAGES_HELP),
    allow_mismatch: bool = typer.Option(False, "--allow-preprocessing-mismatch",
                                        help="For a store: export volumes preprocessed otherwise than the model's "
                                             "training data (recorded in each sidecar) instead of refusing."),
) -> None:
    """Write anomaly maps a clinician can open, for a file, a folder of B-scans or every volume of a store.

    The same preprocessing as training (recorded in the model bundle; a store preprocessed
    otherwise is refused); 64x64 windows over the flattened retina (last window flush with the
    border), merged with separate sum and weight arrays; unflattened to the source geometry;
    zero outside ILM..BM; calibrated against the model's held-out normal scores. Per volume:
    NIfTI maps with a JSON sidecar, DICOM (Parametric Map + Segmentation for DICOM sources, else
    Secondary Capture), PNG overlays and a GIF, the en-face map with the ETDRS grid (not for a
    single B-scan), and report.html. A folder of independent B-scans gives one sub-folder per
    image. The screening index (index.html, index.csv) lists every volume, failed ones with the
    reason; a store export is resumable. Exit code 1 when the input or any volume failed.

    Example: octpipe export cohort.zarr --model models/fanogan-phantom -o exports/
    """
    from octpipe.errors import OctpipeError

    check_map_options(weighting, device, precision)
    if not math.isfinite(threshold) or threshold <= 0:
        raise typer.BadParameter(f"must be a number > 0, got {threshold}", param_hint="--threshold")
    spacing = spacing_option(spacing_mm)
    images = images_option(images)
    if not source.exists():
        raise OctpipeError("no such file or folder", source)
    from octpipe.export.anomaly import MapSettings  # torch: imported once the arguments are known to be good
    from octpipe.export.run import export_path

    settings = MapSettings(stride=stride, weighting=weighting, batch_size=batch_size, device=device,
                           precision=precision, threshold_z=threshold)
    is_store = source.is_dir() and (source / "zarr.json").is_file()
    if is_store:
        if spacing is not None:
            raise typer.BadParameter("applies to files and folders: a store's volumes keep the spacing they were "
                                     "ingested with (re-ingest with --spacing-mm)", param_hint="--spacing-mm")
        if images != "auto":
            raise typer.BadParameter("applies to folders of B-scan images, not a store", param_hint="--images")
        result = _export_store(source, model, out, volume, settings, workers, scheduler, source_root, overwrite,
                               allow_mismatch)
    else:
        if volume:
            raise typer.BadParameter("--volume applies to a store, not a file", param_hint="--volume")
        if allow_mismatch:
            raise typer.BadParameter("applies to a store: a file is always prepared with the model's preprocessing",
                                     param_hint="--allow-preprocessing-mismatch")
        result = export_path(source, model, out, settings=settings, overwrite=overwrite, spacing=spacing,
                             images=images)
    for note in result.notes:
        if state["verbosity"] >= 0:
            typer.echo(f"note: {note}", err=True)
    if state["verbosity"] >= 0:
        typer.echo(f"export: {len(result.done)} written, {len(result.skipped)} skipped, {len(result.failed)} failed "
                   f"in {result.seconds:.1f} s -> {result.out_dir / 'index.html'}")
        if state["verbosity"] > 0:
            for vid in [*result.done, *result.skipped]:
                if vid in result.names:
                    typer.echo(f"  {result.names[vid]} -> {vid}")
    for vid, reason in sorted(result.failed.items()):
        name = result.names.get(vid)
        typer.echo(f"  failed {f'{name} ({vid})' if name else vid}: {reason}", err=True)
    if result.failed:
        raise typer.Exit(1)


def _export_store(source, model, out, volume, settings, workers, scheduler, source_root, overwrite, allow_mismatch):
    from octpipe.export.run import export_store
    from octpipe.store import volume_ids

    kwargs = {"volume_ids": volume or None, "settings": settings, "workers": workers, "scheduler": scheduler,
              "overwrite": overwrite, "source_root": source_root, "allow_preprocessing_mismatch": allow_mismatch}
    if not state["progress"]:
        return export_store(source, model, out, **kwargs)
    from rich.progress import Progress

    n = len(volume) if volume else len(volume_ids(source))
    with Progress(transient=False) as bar:
        task = bar.add_task("export", total=n)
        return export_store(source, model, out, progress=lambda vid, status: bar.advance(task), **kwargs)
