"""``octpipe calibrate``: calibrate a model's volume percentile on normal volumes."""

from __future__ import annotations

from pathlib import Path

import typer

from octpipe.cli import app, state


@app.command()
def calibrate(
    model: Path = typer.Argument(..., help="A trained run or bundled model folder (its model.pt is updated)."),
    sources: list[Path] = typer.Argument(..., help="Normal volumes never used in training: OCT files or folders "
                                                   "(a folder of single B-scans gives one volume per image)."),
    stride: int = typer.Option(16, "--stride", min=1, help="Window step, as the exports will use. Default 16."),
    weighting: str = typer.Option("gaussian", "--weighting", help="Window merge weights, as the exports will use."),
    device: str = typer.Option("auto", "--device", help="auto (default; CUDA when available), cpu or cuda."),
    precision: str = typer.Option("auto", "--precision", help="auto (default), fp32, tf32 or bf16."),
) -> None:
    """Score normal volumes exactly as octpipe export does and store their volume scores in the model.

    Exports then report each volume's percentile among these normal volumes (without this,
    among normal patches, where a healthy volume sits near the 99th by construction). Give
    at least 5 volumes, held out from training and from the device the exports will see.

    Example: octpipe calibrate models/fanogan-octdl normal-scans/
    """
    from octpipe.cli.export import check_map_options
    from octpipe.errors import OctpipeError
    from octpipe.export.calibrate import calibrate_volumes

    check_map_options(weighting, device, precision)
    missing = [s for s in sources if not s.exists()]
    if missing:
        raise OctpipeError("no such file or folder", missing[0])
    record, failed = calibrate_volumes(model, sources, stride=stride, weighting=weighting, device=device,
                                       precision=precision)
    for line in failed:
        typer.echo(f"  failed {line}", err=True)
    if state["verbosity"] >= 0:
        values = record["sorted"]
        typer.echo(f"calibrate: {record['n']} normal volumes (stride {stride}); volume score median "
                   f"{values[len(values) // 2]:.4g}, max {values[-1]:.4g} -> {model / 'model.pt'}")
