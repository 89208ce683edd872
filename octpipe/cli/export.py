"""``octpipe export``: full-volume anomaly maps, overlays, en-face map, DICOM/NIfTI and HTML reports."""

from __future__ import annotations

from pathlib import Path

import typer

from octpipe.cli import app, state


@app.command()
def export(
    source: Path = typer.Argument(..., help="An OCT file (any supported format) or an ingested store (STORE.zarr)."),
    model: Path = typer.Option(..., "--model", help="A trained run (octpipe train) or a bundled model folder, "
                                                    "e.g. models/fanogan-phantom."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder: one sub-folder per volume, index.html and "
                                                       "index.csv."),
    volume: list[str] = typer.Option(None, "--volume", help="For a store: export only this volume id "
                                                             "(repeatable). Default: every complete volume."),
    stride: int = typer.Option(16, "--stride", min=1, help="Window step in pixels. Default 16."),
    weighting: str = typer.Option("gaussian", "--weighting", help="Window merge weights: gaussian (default), "
                                                                  "hann or constant."),
    threshold: float = typer.Option(3.0, "--threshold", min=0.0, help="Residual, in units of the normal RMS "
                                                                      "residual, above which voxels are segmented. "
                                                                      "Default 3."),
    batch_size: int = typer.Option(256, "--batch-size", min=1, help="Windows per forward pass. Default 256."),
    device: str = typer.Option("auto", "--device", help="auto (default; CUDA when available), cpu or cuda."),
    precision: str = typer.Option("auto", "--precision", help="auto (default: bf16 on CUDA and on CPUs with "
                                                              "native bf16, else fp32), fp32, tf32 or bf16."),
    workers: int = typer.Option(0, "--workers", min=0, help="For a store: Dask worker processes; 0 (default) "
                                                            "runs in this process."),
    scheduler: str = typer.Option(None, "--scheduler", help="Address of an existing dask.distributed scheduler."),
    source_root: Path = typer.Option(None, "--source-root", help="For a store: the folder it was ingested from, "
                                                                 "so DICOM sources can be referenced."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Redo volumes already exported."),
) -> None:
    """Write anomaly maps a clinician can open, for one file or every volume of a store.

    The same preprocessing as training; 64x64 windows over the flattened retina (last window flush
    with the border), merged with separate sum and weight arrays; unflattened to the source
    geometry; zero outside ILM..BM; calibrated against the model's held-out normal scores. Per
    volume: NIfTI maps with a JSON sidecar, DICOM (Parametric Map + Segmentation for DICOM
    sources, else Secondary Capture), PNG overlays and a GIF, the en-face map with the ETDRS grid,
    and report.html. A store export is resumable and writes the screening index (index.html,
    index.csv). Exit code 1 when any volume failed.

    Example: octpipe export cohort.zarr --model models/fanogan-phantom -o exports/
    """
    from octpipe.export.anomaly import MapSettings
    from octpipe.export.run import export_file
    from octpipe.heatmap import WEIGHTINGS

    if weighting not in WEIGHTINGS:
        raise typer.BadParameter(f"must be one of {', '.join(WEIGHTINGS)}, got {weighting!r}", param_hint="--weighting")
    if device not in ("auto", "cpu", "cuda"):
        raise typer.BadParameter(f"must be auto, cpu or cuda, got {device!r}", param_hint="--device")
    if precision not in ("auto", "fp32", "tf32", "bf16"):
        raise typer.BadParameter(f"must be auto, fp32, tf32 or bf16, got {precision!r}", param_hint="--precision")
    if not source.exists():
        raise typer.BadParameter(f"{source} does not exist", param_hint="SOURCE")
    settings = MapSettings(stride=stride, weighting=weighting, batch_size=batch_size, device=device,
                           precision=precision, threshold_z=threshold)
    is_store = source.is_dir() and (source / "zarr.json").is_file()
    if is_store:
        result = _export_store(source, model, out, volume, settings, workers, scheduler, source_root, overwrite)
    else:
        if volume:
            raise typer.BadParameter("--volume applies to a store, not a file", param_hint="--volume")
        result = export_file(source, model, out, settings=settings, overwrite=overwrite)
    if state["verbosity"] >= 0:
        typer.echo(f"export: {len(result.done)} written, {len(result.skipped)} skipped, {len(result.failed)} failed "
                   f"in {result.seconds:.1f} s -> {result.out_dir / 'index.html'}")
        for vid, reason in sorted(result.failed.items()):
            typer.echo(f"  failed {vid}: {reason}", err=True)
    if result.failed:
        raise typer.Exit(1)


def _export_store(source, model, out, volume, settings, workers, scheduler, source_root, overwrite):
    from octpipe.export.run import export_store
    from octpipe.store import volume_ids

    n = len(volume) if volume else len(volume_ids(source))
    if not state["progress"]:
        return export_store(source, model, out, volume_ids=volume or None, settings=settings, workers=workers,
                            scheduler=scheduler, overwrite=overwrite, source_root=source_root)
    from rich.progress import Progress

    with Progress(transient=False) as bar:
        task = bar.add_task("export", total=n)
        return export_store(source, model, out, volume_ids=volume or None, settings=settings, workers=workers,
                            scheduler=scheduler, overwrite=overwrite, source_root=source_root,
                            progress=lambda vid, status: bar.advance(task))
