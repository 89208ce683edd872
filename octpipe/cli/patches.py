"""``octpipe patches``: 64×64 patch datasets from an ingested store."""

from __future__ import annotations

from pathlib import Path

import typer

from octpipe.cli import app, state


@app.command()
def patches(
    store: Path = typer.Argument(..., help="An ingested store (STORE.zarr)."),
    split: str = typer.Option(..., "--split", help="train: random patches of healthy volumes; test: a regular "
                                                   "grid over every volume."),
    patch: int = typer.Option(64, "--patch", min=1, help="Patch size in pixels. Default 64 (the paper)."),
    stride: int = typer.Option(32, "--stride", min=1, help="Grid stride in pixels for --split test. Default 32."),
    k: int = typer.Option(64, "--k", min=1, help="Random patches per B-scan for --split train. Default 64."),
    seed: int = typer.Option(0, "--seed", help="Seed of the random positions. Default 0."),
    include_unknown: bool = typer.Option(False, "--include-unknown",
                                         help="For train, also use volumes whose health is unknown."),
    dtype: str = typer.Option("float16", "--dtype", help="float16 (default) or float32 storage."),
    workers: int = typer.Option(None, "--workers", min=0, help="Dask worker processes; default all cores; "
                                                               "0 runs in this process."),
    scheduler: str = typer.Option(None, "--scheduler", help="Address of an existing dask.distributed scheduler."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing split."),
    name: str = typer.Option(None, "--name", help="Write the split as patches/NAME instead of patches/SPLIT, "
                                                  "e.g. --split test --name calib for a grid of held-out normal "
                                                  "volumes (training's data.val_split)."),
) -> None:
    """Cut the flattened volumes of STORE into 64×64 patches under STORE/patches/SPLIT.

    Each patch keeps (volume, bscan, row, col), a label (1 any lesion pixel, 0 none, -1
    unknown) and, for annotated volumes, its mask.

    Example: octpipe patches cohort.zarr --split train --k 64 --seed 0
    """
    from octpipe.patches import SPLITS, write_patch_split

    if split not in SPLITS:
        raise typer.BadParameter(f"must be one of {', '.join(SPLITS)}, got {split!r}", param_hint="--split")
    result = write_patch_split(store, split, patch=patch, stride=stride, k=k, seed=seed,
                               include_unknown=include_unknown, dtype=dtype, workers=workers, scheduler=scheduler,
                               overwrite=overwrite, progress=state["progress"], name=name)
    if state["verbosity"] >= 0:
        c = result.label_counts
        typer.echo(f"patches {name or split}: {result.n_patches} patches from {result.n_volumes} volumes "
                   f"(normal {c[0]}, anomalous {c[1]}, unknown {c[-1]}) in {result.seconds} s -> {result.path}")
