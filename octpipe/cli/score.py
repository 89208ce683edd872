"""``octpipe score``: f-AnoGAN anomaly scores of every patch of a split."""

from __future__ import annotations

from pathlib import Path

import typer

from octpipe.cli import app, state


@app.command()
def score(
    store: Path = typer.Argument(..., help="A store with patches (octpipe patches STORE --split test)."),
    model: Path = typer.Option(..., "--model", help="A run directory written by octpipe train."),
    out: Path = typer.Option(..., "--out", "-o", help="Output CSV: volume_id, bscan, row, col, label, A_R, A_D, A, "
                                                       "z_distance (one row per patch)."),
    split: str = typer.Option("test", "--split", help="Patch split to score. Default test."),
    batch_size: int | None = typer.Option(None, "--batch-size", min=1,
                                            help="Patches per forward pass. Default: 32 for float32 on a "
                                                 "CPU, else 256."),
    device: str = typer.Option("auto", "--device", help="auto (default; CUDA when available), cpu or cuda."),
    precision: str = typer.Option("auto", "--precision", help="auto (default: bf16 autocast on CUDA and on "
                                                              "CPUs with native bf16, else fp32), fp32, tf32 "
                                                              "or bf16."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output."),
) -> None:
    """Score every patch of a split with a trained f-AnoGAN (A = A_R + κ·A_D, z distance).

    Patches are streamed from the store in order, one Zarr chunk at a time; every patch is
    scored (the last partial batch too). A sidecar OUT.json records the model, split, device,
    octpipe version and git hash.

    Example: octpipe score cohort.zarr --model runs/fanogan --split test -o scores.csv
    """
    from octpipe.models.fanogan.store_scores import score_store

    if device not in ("auto", "cpu", "cuda"):
        raise typer.BadParameter(f"must be auto, cpu or cuda, got {device!r}", param_hint="--device")
    if precision not in ("auto", "fp32", "tf32", "bf16"):
        raise typer.BadParameter(f"must be auto, fp32, tf32 or bf16, got {precision!r}", param_hint="--precision")
    result = score_store(store, model, split, out, batch_size=batch_size, device=device, precision=precision,
                         overwrite=overwrite, progress=state["progress"])
    if state["verbosity"] >= 0:
        typer.echo(f"scored {result.n_patches} patches of split {split} in {result.seconds} s on {result.device} "
                   f"({result.precision}) -> {result.path}")
