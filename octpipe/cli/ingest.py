"""``octpipe ingest``: Dask-parallel, resumable batch ingestion into a Zarr store."""

from __future__ import annotations

import math
from pathlib import Path

import typer

from octpipe.cli import app, state
from octpipe.cli.info import IMAGES_HELP, SPACING_HELP, images_option, spacing_option


def memory_limit_option(text: str) -> str:
    """``auto`` or a positive size (``2GB``, ``512MiB``, bytes); a usage error otherwise."""
    if text == "auto":
        return text
    from dask.utils import parse_bytes

    try:
        size = parse_bytes(text)
    except (ValueError, TypeError):
        raise typer.BadParameter(f"needs auto or a size such as 2GB, got {text!r}", param_hint="--memory-limit") \
            from None
    if size <= 0:
        raise typer.BadParameter(f"needs a size > 0, got {text!r}", param_hint="--memory-limit")
    return text


#: Largest lateral target spacing accepted, mm: coarser leaves a B-scan of a handful of A-scans.
MAX_TARGET_SPACING_MM = 0.5


def _target_spacing(value: float) -> float:
    if not math.isfinite(value) or not 0 < value <= MAX_TARGET_SPACING_MM:
        raise typer.BadParameter(f"needs a lateral spacing in mm, 0 < value <= {MAX_TARGET_SPACING_MM} "
                                 f"(the paper's is 0.0226), got {value}", param_hint="--target-spacing")
    return value


def _percentiles(text: str | None) -> tuple[float, float] | None:
    if not text:
        return None
    try:
        low, high = (float(v) for v in text.split(","))
    except ValueError:
        raise typer.BadParameter(f"needs LOW,HIGH percentiles, got {text!r}", param_hint="--robust") from None
    if not 0 <= low < high <= 100:
        raise typer.BadParameter(f"needs 0 <= LOW < HIGH <= 100, got {text!r}", param_hint="--robust")
    return low, high


@app.command()
def ingest(
    sources: list[Path] = typer.Argument(..., help="Files and folders to ingest (searched recursively)."),
    out: Path = typer.Option(..., "--out", "-o", help="The Zarr store (STORE.zarr), created when missing."),
    workers: int = typer.Option(None, "--workers", min=0,
                                help="Worker processes of the local Dask cluster. Default: all cores. "
                                     "0 runs in this process without Dask."),
    scheduler: str = typer.Option(None, "--scheduler", help="Address of an existing dask.distributed scheduler "
                                                            "(tcp://host:8786) instead of a local cluster."),
    manifest: Path = typer.Option(None, "--manifest", help="CSV manifest path. Default: STORE-manifest.csv "
                                                           "beside the store (the store keeps its own copy)."),
    memory_limit: str = typer.Option("auto", "--memory-limit", help="Memory per local worker, e.g. 2GB. "
                                                                    "Default auto (RAM / workers)."),
    robust: str = typer.Option(None, "--robust", help="Normalise with these percentiles (e.g. 0.5,99.5) instead "
                                                      "of the volume's min and max (the paper's rule, default)."),
    label: str = typer.Option(None, "--label", help="healthy or diseased: the label of inputs without "
                                                    "annotations (e.g. a folder of normal scans for training). "
                                                    "Default: unknown."),
    factor: int = typer.Option(None, "--factor", min=1, help="Column downsampling factor. Default: from "
                                                             "--target-spacing."),
    target_spacing: float = typer.Option(0.0226, "--target-spacing", help="Lateral spacing after column "
                                                                          "downsampling, mm. Default 0.0226 "
                                                                          "(the paper's 512 -> 256)."),
    display: str = typer.Option("log", "--display", help="Linear-to-display mapping for .vol/.E2E data: log "
                                                         "(default, matches Heyex exports) or root4."),
    no_vendor_layers: bool = typer.Option(False, "--no-vendor-layers", help="Always segment ILM/BM, even when "
                                                                            "the file has the device's layers."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Redo volumes that are already complete."),
    keep_paths: bool = typer.Option(False, "--keep-paths/--hash-paths",
                                    help="Record the inputs' file paths in the store and logs. Default: salted "
                                         "hashes there (file and folder names can carry patient names); the "
                                         "readable paths go only to the manifest beside the store."),
    images: str = typer.Option("auto", "--images", help=IMAGES_HELP + " The manifest's images column says which "
                                                                      "was taken."),
    spacing_mm: str = typer.Option(None, "--spacing-mm", help=SPACING_HELP + " Applies to every input of the run."),
) -> None:
    """Read every OCT file under SOURCES, preprocess each volume as in the paper and write the store.

    Preprocessing: display domain, [-1, 1] per volume, columns downsampled, ILM/BM found
    (or the device's layers used), retina flattened to Bruch's membrane.

    One Dask task per file; a bad file is recorded as failed and the batch goes on; a
    rerun skips volumes already complete. Exit code 0 when every input succeeded or was
    skipped, 1 when any failed.

    The images of a folder are one volume when they have one size and names numbered in
    sequence (Image 1..19.tif, bscan_000.png ...), else independent B-scans, one volume
    each (--images overrides; the manifest's images column records the choice).

    Example: octpipe ingest exports/ -o cohort.zarr --workers 2
    """
    from octpipe.pipeline import ingest as run_ingest
    from octpipe.preprocess.prepare import PreprocessConfig

    labels = {None: None, "healthy": 0, "diseased": 1}
    if label not in labels:
        raise typer.BadParameter(f"must be healthy or diseased, got {label!r}", param_hint="--label")
    if display not in ("log", "root4"):
        raise typer.BadParameter(f"must be log or root4, got {display!r}", param_hint="--display")
    spacing = spacing_option(spacing_mm)
    images = images_option(images)
    memory_limit = memory_limit_option(memory_limit)
    target_spacing = _target_spacing(target_spacing)
    config = PreprocessConfig(display_transform=display, normalize_percentiles=_percentiles(robust), factor=factor,
                              target_spacing_mm=target_spacing, use_vendor_layers=not no_vendor_layers)
    result = run_ingest(sources, out, workers=workers, scheduler=scheduler, manifest=manifest,
                        overwrite=overwrite, memory_limit=memory_limit, config=config, label=labels[label],
                        progress=state["progress"], echo=(lambda line: typer.echo(line, err=True))
                        if state["verbosity"] >= 0 else None, keep_paths=keep_paths, images=images,
                        spacing=spacing)
    c = result.counts
    if state["verbosity"] >= 0:
        typer.echo(f"ingest: {c['ok']} written, {c['skipped']} skipped, {c['failed']} failed in {result.seconds} s; "
                   f"store {result.store}, manifest {result.manifest}")
    if not result.ok:
        raise typer.Exit(1)
    if not any(r["volume_id"] for r in result.rows):  # an empty folder, or one of other files only
        names = ", ".join(str(s) for s in sources)
        typer.echo(f"error: {names}: no OCT file found ({len(result.rows)} other files skipped)", err=True)
        raise typer.Exit(1)
