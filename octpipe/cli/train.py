"""``octpipe train``: f-AnoGAN training (WGAN-GP, then the encoder) on a store's patches."""

from __future__ import annotations

import os
from pathlib import Path

import typer

from octpipe.cli import app, state


@app.command()
def train(
    store: Path = typer.Argument(..., help="A store with training patches (octpipe patches STORE --split train)."),
    out: Path = typer.Option(..., "--out", "-o", help="Run directory: config, log.csv, checkpoints, samples, "
                                                       "calibration.json and model.pt."),
    stage: str = typer.Option("all", "--stage", help="gan, encoder or all (default: GAN, then encoder)."),
    config: Path = typer.Option(None, "--config", help="Training config YAML (see pipelines/fanogan.yaml). "
                                                       "Default: with --resume the run's own config.yaml, "
                                                       "else the official f-AnoGAN settings."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the run's last checkpoints (same losses "
                                                        "as an uninterrupted run); starts afresh when there are "
                                                        "none."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Discard the run's previous contents (with --stage "
                                                              "encoder: only the encoder's)."),
    iterations: int = typer.Option(None, "--iterations", min=1, help="Override the length of the trained stage(s): "
                                                                     "gan.iterations (units of gan.count, default "
                                                                     "critic steps) and/or encoder.iterations."),
    device: str = typer.Option(None, "--device", help="auto, cpu or cuda; overrides runtime.device (default auto)."),
    precision: str = typer.Option(None, "--precision", help="auto, fp32, tf32 or bf16; overrides "
                                                            "runtime.precision (default auto: fp32 on CPU, tf32 "
                                                            "on CUDA)."),
    seed: int = typer.Option(None, "--seed", min=0, help="Overrides runtime.seed (default 0)."),
    threads: int = typer.Option(None, "--threads", min=0, help="CPU threads per process; overrides runtime.threads "
                                                               "(default 0 = PyTorch's default)."),
) -> None:
    """Train f-AnoGAN: the WGAN-GP generator and critic, then the izi_f encoder.

    Uses the store's training patches (never those with a lesion) and holds out normal patches for
    validation and score calibration. The resolved config, octpipe version and git hash are
    saved in RUN. Several GPUs or processes: torchrun --nproc_per_node=N --no-python octpipe
    train ... (batch_size is per process; only rank 0 writes and prints).

    Example: octpipe train cohort.zarr -o runs/fanogan --config pipelines/fanogan.yaml
    """
    from octpipe.models.fanogan.config import FAnoGANConfig, load_config
    from octpipe.models.fanogan.train import train as run_training

    if stage not in ("gan", "encoder", "all"):
        raise typer.BadParameter(f"must be gan, encoder or all, got {stage!r}", param_hint="--stage")
    if device is not None and device not in ("auto", "cpu", "cuda"):
        raise typer.BadParameter(f"must be auto, cpu or cuda, got {device!r}", param_hint="--device")
    if precision is not None and precision not in ("auto", "fp32", "tf32", "bf16"):
        raise typer.BadParameter(f"must be auto, fp32, tf32 or bf16, got {precision!r}", param_hint="--precision")
    if out.exists() and not out.is_dir():
        from octpipe.errors import OctpipeError

        raise OctpipeError("is a file, not a run folder", out)
    saved = out / "config.yaml"
    if config is not None:
        cfg = load_config(config)
    elif resume and saved.is_file():  # a resumed run continues with its own settings
        cfg = load_config(saved)
    else:
        cfg = FAnoGANConfig()
    overrides: dict[str, object] = {}
    if iterations is not None:
        if stage in ("gan", "all"):
            overrides["gan.iterations"] = iterations
        if stage in ("encoder", "all"):
            overrides["encoder.iterations"] = iterations
    for key, value in (("runtime.device", device), ("runtime.precision", precision), ("runtime.seed", seed),
                       ("runtime.threads", threads)):
        if value is not None:
            overrides[key] = value
    if overrides:
        cfg = cfg.with_overrides(overrides)
    results = run_training(store, out, cfg, stage=stage, resume=resume, overwrite=overwrite,
                           progress=state["progress"])
    if state["verbosity"] < 0 or int(os.environ.get("RANK", "0")) != 0:
        return
    for name, r in results.items():
        rt = r["runtime"]
        where = f"{rt['device']}/{rt['precision']}" + (f" x{rt['world_size']}" if rt["world_size"] > 1 else "")
        if name == "gan":
            last = r["last"]
            w = f", Wasserstein {last['wasserstein']:.4g}" if last else ""
            typer.echo(f"gan: critic step {r['critic_step']}, generator step {r['generator_step']} "
                       f"({r['steps_run']} critic steps run{w}) in {r['seconds']} s on {where} -> {r['checkpoint']}")
        else:
            val = f", val loss {r['val_loss']:.4g}" if r["val_loss"] is not None else ""
            cal = f"; calibration {r['calibration']}" if r["calibration"] else "; no held-out patches, no calibration"
            typer.echo(f"encoder: step {r['step']} ({r['steps_run']} run{val}) in {r['seconds']} s on {where}{cal} "
                       f"-> {r['bundle']}")
