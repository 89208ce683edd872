"""Prepared GPU check: f-AnoGAN inference, training and export speed on one CUDA device, in one short call.

Sections, each timed after a warm-up, each written to the JSON as soon as it is done (so a run cut
short still reports what it measured; a failing section is recorded under ``errors`` and the
others still run):

1. **Inference** at the paper config (latent 128, dim 64, 64x64, random seeded weights), patches
   already on the device, patches/s of:

   - ``octpipe-fast``: what ``score_patches`` runs per batch with its defaults (``_setup`` then
     ``_score_batch``: the prepared networks of ``octpipe.models.fanogan.inference``, bf16
     autocast on CUDA, channels_last, the z-distance encoder pass included), per batch size;
   - ``octpipe-naive-fp32``: the same code with ``fast=False, precision='fp32'``, NCHW;
   - ``cuda-graph-fast``: ``octpipe-fast`` at the largest batch captured in a CUDA graph (autocast
     without its weight-cast cache, as CUDA graphs need) and replayed;
   - ``compiled-fast``: ``torch.compile(mode='reduce-overhead')`` (inductor plus CUDA graphs) of
     ``octpipe-fast`` at the largest batch, its compile time recorded (skipped when over
     ``--compile-limit-s`` or when the time budget is short);
   - ``score_patches-end-to-end``: ``score_patches`` on host (NumPy) patches, transfers included.

   Target: at least 20,000 patches/s on an H200.
2. **Training**: WGAN-GP generator iterations/s at the paper width (5 critic steps with the
   gradient penalty, then 1 generator step, batch 64, Adam 1e-4 betas (0, 0.9), the training
   ``auto`` precision: TF32 on CUDA), through octpipe's losses.
3. **Export**: seconds per volume of ``export_volume`` (maps, pictures, NIfTI, DICOM, report) for a
   full-size phantom (49x496x512, fluid lesions) ingested with the default preprocessing, paper
   model with untrained weights and a synthetic calibration, as ``benchmarks/export.py`` runs it.

``--device cpu --quick`` runs every section in seconds at small sizes (dim 8, training batch 8, a
3-B-scan phantom, one repetition, no warm-up) and writes a JSON that says device cpu: a smoke test of the script
(``tests/models/test_fanogan_inference.py``), not a measurement.

Writes ``benchmarks/results/gpu.json`` on CUDA (on CPU without ``--out``: a temporary file).

Usage: .venv/bin/python benchmarks/gpu_check.py [--device cuda] [--quick] [--budget-s 420] [--out FILE]
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from octpipe.models.fanogan.checkpoint import FAnoGANModel, build_networks, save_model  # noqa: E402
from octpipe.models.fanogan.config import FAnoGANConfig  # noqa: E402
from octpipe.models.fanogan.losses import (  # noqa: E402
    anomaly_scores,
    latent_distances,
    wgan_generator_loss,
    wgan_gp_critic_loss,
)
from octpipe.models.fanogan.networks import bn_stat_updates  # noqa: E402
from octpipe.models.fanogan.score import (  # noqa: E402
    SCORE_NAMES,
    _score_batch,
    _setup,
    calibrate,
    precision_context,
    resolve_precision,
    score_patches,
)

TARGET_PATCHES_PER_S = 20000
T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def rate(fn: Callable[[], object], dev: torch.device, items: int, min_s: float, warmup: int) -> float:
    """Items per second of ``fn`` (``items`` per call) after ``warmup`` calls, over at least ``min_s``."""
    for _ in range(warmup):
        fn()
    sync(dev)
    n, t0 = 0, time.perf_counter()
    while True:
        fn()
        n += 1
        sync(dev)
        if time.perf_counter() - t0 >= min_s:
            return items * n / (time.perf_counter() - t0)


def model_config(dim: int) -> FAnoGANConfig:
    return FAnoGANConfig.from_dict({"model": {"latent_dim": 128, "dim": dim, "image_size": 64, "channels": 1}})


def seeded_model(dim: int) -> FAnoGANModel:
    """Untrained networks (seeded), in eval mode, with a synthetic calibration."""
    torch.manual_seed(0)
    g, d, e = build_networks(model_config(dim))
    rng = np.random.default_rng(0)
    cal = calibrate({k: rng.gamma(2.0, 0.05, 2000) for k in SCORE_NAMES}, source="synthetic (gpu_check)")
    return FAnoGANModel(g, d, e, model_config(dim), calibration=cal).eval()


# --------------------------------------------------------------------------------------------
# 1. Inference
# --------------------------------------------------------------------------------------------
def graph_replay(run: FAnoGANModel, x: torch.Tensor, dev: torch.device) -> Callable[[], object]:
    """``octpipe-fast`` on a static batch, captured once in a CUDA graph; returns the replay."""
    def step() -> torch.Tensor:
        with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
            z = run.encoder(x)
            x_rec = run.generator(z).float()
            f_x, f_rec = run.discriminator.features(torch.cat([x, x_rec])).float().split(len(x))
            z_rec = run.encoder(x_rec)
        s = anomaly_scores(x, x_rec, f_x, f_rec, kappa=run.kappa)
        return torch.stack([s.residual, s.feature, s.total, latent_distances(z.float(), z_rec.float())])

    stream = torch.cuda.Stream(dev)
    stream.wait_stream(torch.cuda.current_stream(dev))
    with torch.cuda.stream(stream), torch.inference_mode():
        for _ in range(3):
            step()
    torch.cuda.current_stream(dev).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.inference_mode(), torch.cuda.graph(graph):
        step()
    return graph.replay


def check_inference(args: argparse.Namespace, dev: torch.device, report: dict) -> dict:
    """Section 1 (module docstring)."""
    model = seeded_model(args.dim)
    run, _, prec, fmt = _setup(model, dev, "auto", "auto", fast=True)
    naive, _, _, naive_fmt = _setup(copy.deepcopy(model), dev, "fp32", False, fast=False)
    gen = torch.Generator().manual_seed(1)
    big = max(args.batches)
    host = torch.rand(big, 1, 64, 64, generator=gen) * 2 - 1
    x = host.to(dev).contiguous(memory_format=fmt)
    out: dict = {"config": {"latent_dim": 128, "dim": args.dim, "image_size": 64}, "precision": prec,
                 "variants": {}}
    variants = out["variants"]
    with torch.inference_mode():
        per_batch = {b: rate(lambda b=b: _score_batch(run, x[:b], prec, dev), dev, b, args.min_s, args.warmup)
                     for b in args.batches}
        best = max(per_batch, key=per_batch.get)
        variants["octpipe-fast"] = {"patches_per_s": round(per_batch[best], 1), "batch": best,
                                    "per_batch": {str(b): round(r, 1) for b, r in per_batch.items()}}
        log(f"octpipe-fast {per_batch}")
        xn = x[:args.naive_batch].contiguous(memory_format=naive_fmt)
        r = rate(lambda: _score_batch(naive, xn, "fp32", dev), dev, len(xn), args.min_s, args.warmup)
        variants["octpipe-naive-fp32"] = {"patches_per_s": round(r, 1), "batch": len(xn)}
        log(f"octpipe-naive-fp32 {r:.1f}")
    report["inference"] = out
    if dev.type == "cuda":
        replay = graph_replay(run, x[:big], dev)
        variants["cuda-graph-fast"] = {"patches_per_s": round(rate(replay, dev, big, args.min_s, args.warmup), 1),
                                       "batch": big}
        log(f"cuda-graph-fast {variants['cuda-graph-fast']}")
        try:
            variants["compiled-fast"] = compiled_rate(run, x[:big], prec, dev, args)
        except Exception as exc:  # noqa: BLE001 - an inductor failure must not cost the other figures
            variants["compiled-fast"] = {"failed": f"{type(exc).__name__}: {exc}"[:1000]}
            traceback.print_exc(file=sys.stderr)
    n_e2e = big * args.e2e_batches
    patches = np.repeat(host.numpy(), args.e2e_batches, axis=0)
    if args.warmup:
        score_patches(model, patches[:big], batch_size=big, device=dev)
    sync(dev)
    t = time.perf_counter()
    score_patches(model, patches, batch_size=big, device=dev)
    sync(dev)
    variants["score_patches-end-to-end"] = {"patches_per_s": round(n_e2e / (time.perf_counter() - t), 1),
                                            "batch": big, "n_patches": n_e2e}
    best_rate = max(v["patches_per_s"] for v in variants.values() if "patches_per_s" in v)
    out["best_patches_per_s"] = best_rate
    out["target_patches_per_s"] = TARGET_PATCHES_PER_S
    out["target_met"] = best_rate >= TARGET_PATCHES_PER_S if dev.type == "cuda" and not args.quick else None
    return out


def compiled_rate(run: FAnoGANModel, x: torch.Tensor, prec: str, dev: torch.device, args: argparse.Namespace
                  ) -> dict:
    """``compiled-fast``: compile time and patches/s, or why it was skipped."""
    left = args.budget_s - (time.perf_counter() - T0)
    if left < args.compile_limit_s + 150:
        return {"skipped": f"{left:.0f} s of the budget left, compile limit {args.compile_limit_s:.0f} s"}
    fn = torch.compile(lambda xb: _score_batch(run, xb, prec, dev)[0], mode="reduce-overhead", dynamic=False)
    t = time.perf_counter()
    with torch.inference_mode():
        fn(x)
        fn(x)
        sync(dev)
        compile_s = time.perf_counter() - t
        log(f"compiled in {compile_s:.1f} s")
        if compile_s > args.compile_limit_s:
            return {"skipped": f"compile took {compile_s:.0f} s > {args.compile_limit_s:.0f} s"}
        r = rate(lambda: fn(x), dev, len(x), args.min_s, args.warmup)
    return {"patches_per_s": round(r, 1), "batch": len(x), "compile_s": round(compile_s, 1),
            "mode": "reduce-overhead"}


# --------------------------------------------------------------------------------------------
# 2. Training
# --------------------------------------------------------------------------------------------
def check_training(args: argparse.Namespace, dev: torch.device, report: dict) -> dict:
    """Section 2 (module docstring); ``--quick`` uses batch 8."""
    torch.manual_seed(0)
    g, d, _ = build_networks(model_config(args.train_dim))
    fmt = torch.channels_last
    g.to(dev, memory_format=fmt).train()
    d.to(dev, memory_format=fmt).train()
    prec = resolve_precision("auto", dev, training=True)
    opt_g = torch.optim.Adam(g.parameters(), lr=1e-4, betas=(0.0, 0.9))
    opt_d = torch.optim.Adam(d.parameters(), lr=1e-4, betas=(0.0, 0.9))
    gen = torch.Generator(device=dev).manual_seed(0)
    n = args.train_batch

    def iteration() -> None:
        for _ in range(5):
            real = (torch.rand(n, 1, 64, 64, device=dev, generator=gen) * 2 - 1).contiguous(memory_format=fmt)
            with precision_context(prec, dev), torch.no_grad(), bn_stat_updates(g, enabled=False):
                fake = g(torch.randn(n, 128, device=dev, generator=gen))
            with precision_context(prec, dev):
                loss_d, _ = wgan_gp_critic_loss(d, real, fake.contiguous(memory_format=fmt))
            opt_d.zero_grad(set_to_none=True)
            loss_d.backward()
            opt_d.step()
        d.requires_grad_(False)
        with precision_context(prec, dev):
            loss_g = wgan_generator_loss(d, g(torch.randn(n, 128, device=dev, generator=gen)))
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        opt_g.step()
        d.requires_grad_(True)

    its = rate(iteration, dev, 1, args.min_s, args.warmup)
    out = {"config": {"latent_dim": 128, "dim": args.train_dim, "image_size": 64, "batch": n},
           "precision": prec, "channels_last": True, "generator_iterations_per_s": round(its, 3),
           "iteration": "5 WGAN-GP critic steps (lambda 10) + 1 generator step, Adam(1e-4, betas=(0, 0.9))"}
    report["training"] = out
    log(f"training {its:.2f} generator iterations/s")
    return out


# --------------------------------------------------------------------------------------------
# 3. Export
# --------------------------------------------------------------------------------------------
def phantom_volume(root: Path, n_bscans: int) -> object:
    """A phantom with fluid, written as a .vol file, ingested, and read back as an export input."""
    from octpipe.pipeline import ingest
    from octpipe.store import read_prepared, volume_ids
    from octpipe.testing.phantom_files import write_phantom_files
    from octpipe.testing.phantoms import make_phantom, parse_lesion_specs

    ph = make_phantom(np.random.default_rng(7), shape=(n_bscans, 496, 512), lesions=parse_lesion_specs("irf:3,srf,ped"),
                      laterality="OD")
    write_phantom_files(ph, root / "src", formats=["vol"])
    store = root / "s.zarr"
    ingest([root / "src"], store, workers=0)
    return read_prepared(store, volume_ids(store)[0])


def check_export(args: argparse.Namespace, dev: torch.device, report: dict) -> dict:
    """Section 3 (module docstring)."""
    from octpipe.export.anomaly import MapSettings
    from octpipe.export.run import export_volume
    from octpipe.models.fanogan.checkpoint import load_run

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t = time.perf_counter()
        vol = phantom_volume(root, args.export_bscans)
        ingest_s = time.perf_counter() - t
        save_model(seeded_model(args.dim), root / "model" / "model.pt")
        model = load_run(root / "model")
        settings = MapSettings(device=dev.type, batch_size=args.export_batch)
        if args.warmup:  # kernels, allocator; not timed
            export_volume(vol, model, root / "warm", settings=settings)
        t = time.perf_counter()
        summary = export_volume(vol, model, root / "out", settings=settings)
        seconds = time.perf_counter() - t
    out = {"volume_shape": [args.export_bscans, 496, 512], "model_dim": args.dim, "batch_size": args.export_batch,
           "seconds_per_volume": round(seconds, 2), "seconds_model": round(summary["seconds_model"], 2),
           "n_windows": summary["n_windows"], "ingest_seconds": round(ingest_s, 1)}
    report["export"] = out
    log(f"export {seconds:.1f} s per volume ({summary['n_windows']} windows)")
    return out


# --------------------------------------------------------------------------------------------
def device_info(dev: torch.device) -> dict:
    info = {"type": dev.type, "torch": torch.__version__, "python": platform.python_version(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        info.update({"name": props.name, "memory_gib": round(props.total_memory / 2**30, 1),
                     "capability": f"{props.major}.{props.minor}", "cuda": torch.version.cuda,
                     "cudnn": torch.backends.cudnn.version()})
    else:
        info["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    return info


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu")
    ap.add_argument("--quick", action="store_true", help="smoke run in seconds (small sizes, one repetition)")
    ap.add_argument("--budget-s", type=float, default=420.0, help="sections after this wall time are skipped")
    ap.add_argument("--compile-limit-s", type=float, default=150.0)
    ap.add_argument("--min-s", type=float, default=2.0, help="seconds per timed measurement")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    args.dim = args.train_dim = 64
    args.batches, args.naive_batch, args.e2e_batches, args.train_batch = [1024, 4096], 1024, 8, 64
    args.export_bscans, args.export_batch, args.warmup = 49, 2048, 2
    if args.quick:
        args.dim = args.train_dim = 8
        args.batches, args.naive_batch, args.e2e_batches, args.train_batch = [16], 16, 2, 8
        args.export_bscans, args.export_batch, args.min_s, args.warmup = 3, 256, 0.0, 0
    if args.out is None:
        args.out = (ROOT / "benchmarks" / "results" / "gpu.json" if args.device.startswith("cuda")
                    else Path(tempfile.gettempdir()) / "gpu_check_cpu.json")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("CUDA is not available; use --device cpu --quick for the smoke run")
    report: dict = {"what": "f-AnoGAN inference, training and export speed on one device (benchmarks/gpu_check.py)",
                    "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"), "quick": args.quick,
                    "device": device_info(dev), "budget_s": args.budget_s, "errors": {}, "skipped": []}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for name, section in (("inference", check_inference), ("training", check_training), ("export", check_export)):
        if time.perf_counter() - T0 > args.budget_s:
            report["skipped"].append(name)
            continue
        try:
            section(args, dev, report)
        except Exception as exc:  # noqa: BLE001 - record it and go on with the next section
            report["errors"][name] = f"{type(exc).__name__}: {exc}"[:1000]
            traceback.print_exc(file=sys.stderr)
        report["wall_s"] = round(time.perf_counter() - T0, 1)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    log(f"wrote {args.out}")
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
