"""``octpipe demo``: the main job on bundled defaults, end to end on a phantom cohort."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import typer

from octpipe.cli import app, state

#: The file that marks a folder as the demo's own (so --overwrite never removes a user's folder).
DEMO_MARK = ".octpipe-demo"


@app.command()
def demo(
    out: Path = typer.Option(Path("demo-output"), "--out", "-o", help="Output folder. Default ./demo-output."),
    n: int = typer.Option(4, "--n", min=2, help="Phantoms in the demo cohort (half healthy). Default 4."),
    seed: int = typer.Option(0, "--seed", help="Cohort seed. Default 0."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing demo folder."),
) -> None:
    """Run every pipeline stage that exists on a small phantom cohort and print where the outputs are.

    Stages: phantom cohort in four vendor formats -> read back with octpipe's readers and
    check geometry against the truth -> Dask ingest with the paper's preprocessing
    (normalise, downsample, ILM/BM, flatten) into a Zarr store -> train/test patch
    datasets -> figure of a phantom B-scan with its truth -> anomaly export (maps, DICOM,
    NIfTI, report, screening index) of a healthy and a diseased phantom with the bundled
    model -> patch- and pixel-level evaluation. The steps are those of pipelines/demo.yaml,
    run as octpipe run runs them, with its demo-run/ folder as the output folder.

    Example: octpipe demo -o demo-output
    """
    from octpipe.demo import run_demo
    from octpipe.errors import OctpipeError

    if out.exists():
        if not overwrite:
            raise OctpipeError("output exists; pass --overwrite to replace it", out)
        if not out.is_dir() or (any(out.iterdir()) and not (out / DEMO_MARK).is_file()):
            raise OctpipeError("not a folder octpipe demo wrote; --overwrite replaces only an earlier demo's "
                               "folder", out)
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / DEMO_MARK).write_text("written by octpipe demo; octpipe demo --overwrite may replace this folder\n")
    t0 = time.perf_counter()
    summary = run_demo(out, n=n, seed=seed, progress=state["progress"], echo=typer.echo)
    summary["wall_s"] = round(time.perf_counter() - t0, 1)
    (out / "demo-summary.json").write_text(json.dumps(summary, indent=2))
    typer.echo(f"demo finished in {summary['wall_s']} s; summary: {out / 'demo-summary.json'}")
    if summary["failures"]:
        raise typer.Exit(1)
