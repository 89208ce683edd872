"""``octpipe evaluate``: image- and pixel-level detection statistics in the paper's layout."""

from __future__ import annotations

from pathlib import Path

import typer

from octpipe.cli import app, state


@app.command()
def evaluate(
    scores: Path = typer.Argument(None, help="A scores CSV written by octpipe score (columns label, A, A_R, "
                                             "A_D, ...). Omit it to score --store with --model instead."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder: metrics.json, metrics.md, roc.png, "
                                                       "histograms.png."),
    score: list[str] = typer.Option(None, "--score", help="Score column to evaluate; repeat for several. "
                                                          "Default: A, A_R and A_D (those present)."),
    store: Path = typer.Option(None, "--store", help="A store with test patches (with --model): scores them and "
                                                     "adds the pixel level against the lesion masks."),
    model: Path = typer.Option(None, "--model", help="An octpipe train run directory (with --store)."),
    split: str = typer.Option("test", "--split", help="Patch split of --store. Default test."),
    pixel: bool = typer.Option(True, "--pixel/--no-pixel", help="Pixel-level statistics (with --store; default "
                                                                "on)."),
    max_pixels: int = typer.Option(0, "--max-pixels", min=0, help="Evaluate a random subset of at most this many "
                                                                  "pixels (default 0 = all)."),
    device: str = typer.Option("auto", "--device", help="auto (default), cpu or cuda (with --store)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace existing outputs."),
) -> None:
    """Detection statistics: ROC AUC and precision, sensitivity, specificity, F1 at the Youden index.

    Patches labelled 1 are anomalous, 0 normal; others (-1, unknown) are left out. With a
    store and a model it also reports the pixel level (the residual |x − G(E(x))| against the
    lesion masks, paper Table B1). Writes a JSON and a Markdown table, ROC curves (Fig. 8)
    and score histograms of normal vs anomalous patches (Fig. B3).

    Example: octpipe evaluate scores.csv -o eval/   or   octpipe evaluate --store cohort.zarr
    --model runs/fanogan -o eval/
    """
    from octpipe.errors import OctpipeError
    from octpipe.evaluate import evaluate_run, read_scores_csv, write_report

    if (scores is None) == (store is None):
        raise typer.BadParameter("give either a scores CSV or --store with --model", param_hint="SCORES")
    if store is not None and model is None:
        raise typer.BadParameter("--store needs --model", param_hint="--model")
    if device not in ("auto", "cpu", "cuda"):
        raise typer.BadParameter(f"must be auto, cpu or cuda, got {device!r}", param_hint="--device")
    pix = None
    if scores is not None:
        table = read_scores_csv(scores)
        source = str(scores)
    else:
        try:
            table, _, pix = evaluate_run(store, model, split=split, pixel=pixel, max_pixels=max_pixels,
                                         device=device)
        except ValueError as exc:  # e.g. a split with only normal (or only anomalous) patches
            raise OctpipeError(f"patches/{split}: {exc}", store) from None
        source = f"{store} ({split}) scored by {model}"
    names = list(score) if score else [n for n in ("A", "A_R", "A_D") if n in table]
    missing = [n for n in names if n not in table]
    if missing:
        raise OctpipeError(f"no score column {', '.join(missing)}; columns: {', '.join(table)}", scores or store)
    try:
        paths = write_report(out, {n: table[n] for n in names}, table["label"], pixel=pix, source=source,
                             overwrite=overwrite)
    except ValueError as exc:
        raise OctpipeError(str(exc), scores or store) from None
    if state["verbosity"] >= 0:
        import json

        data = json.loads(paths["json"].read_text(encoding="utf-8"))
        for name, m in data["image_level"].items():
            typer.echo(f"{name}: AUC {m['auc']:.4f}, F1 {m['f1']:.4f} at the Youden index "
                       f"(sensitivity {m['sensitivity']:.4f}, specificity {m['specificity']:.4f})")
        if data["pixel_level"]:
            p = data["pixel_level"]
            typer.echo(f"pixel level: AUC {p['auc']:.4f} (sensitivity {p['sensitivity']:.4f}, "
                       f"specificity {p['specificity']:.4f})")
        typer.echo(f"-> {paths['markdown']}")
