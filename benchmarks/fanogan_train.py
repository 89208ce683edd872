"""WGAN-GP training speed of ``octpipe.models.fanogan.train.train_gan`` on CPU, per runtime setting.

Measures seconds per generator iteration (one generator step + 5 critic steps with the gradient
penalty, batch 64, Adam 1e-4 betas (0, 0.9)) at 64x64 patches, ``dim`` 16, latent 128, through
the real training loop (data stream, flips, seeded noise, BN-statistics control, loss buffering),
for these runtime settings:

- ``fp32-nchw``: float32, NCHW, eager (the reference);
- ``fp32-cl``: float32, channels_last;
- ``bf16-nchw``: bfloat16 autocast, NCHW (gradient penalty norm, losses and Adam in float32);
- ``bf16-cl``: bfloat16 autocast, channels_last;
- ``bf16-cl-compile``: bf16-cl with ``torch.compile`` of the generator (the critic needs double
  backward, which compiled graphs do not support, so it stays eager).

Each variant is a fresh ``train_gan`` run with ``gan.count: generator`` and ``log_every: 1``;
``log.csv`` has a time stamp per generator iteration, and the time of iteration ``i`` is the
difference of consecutive stamps. The first ``--warmup`` iterations (allocator warm-up, and the
compilation for the compiled variant) are excluded. Variants run in interleaved rounds (every
variant once per round) and the median over all measured iterations is reported, so that load
from other jobs on this shared machine hits every variant alike; compare the ratios.

Also reported: the losses of the first logged iteration of every variant (same seed, so fp32
variants should agree to rounding and bf16 ones closely), the compile time, and the cost of the
data stream per batch.

Writes ``benchmarks/results/fanogan_train.json`` and prints it.

Usage: .venv/bin/python benchmarks/fanogan_train.py [--rounds 3] [--iterations 3] [--warmup 1]
       [--threads 0] [--no-compile] [--out FILE]
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from octpipe.models.data import BatchStream, PatchSource  # noqa: E402
from octpipe.models.fanogan.config import FAnoGANConfig  # noqa: E402
from octpipe.models.fanogan.runtime import Dist  # noqa: E402
from octpipe.models.fanogan.train import train_gan  # noqa: E402

VARIANTS = {
    "fp32-nchw": {"precision": "fp32", "channels_last": False, "compile": False},
    "fp32-cl": {"precision": "fp32", "channels_last": True, "compile": False},
    "bf16-nchw": {"precision": "bf16", "channels_last": False, "compile": False},
    "bf16-cl": {"precision": "bf16", "channels_last": True, "compile": False},
    "bf16-cl-compile": {"precision": "bf16", "channels_last": True, "compile": True},
}


NOTES = [
    "Run with --threads 1: with 2 threads the other jobs on this 2-core machine made OpenMP stall at its barriers "
    "(the same fp32 iteration took 6-60 s from one run to the next); one thread gave stable timings.",
    "The critic step (three critic passes and the double backward of the gradient penalty) dominates; "
    "torch.compile can only take the generator (compiled graphs do not support double backward), so it gains "
    "nothing here and its ~40 s compilation (first run in a process) is not repaid in short runs.",
    "Defaults chosen from this: channels_last on (same numerics up to summation order), fp32 (bf16 autocast is "
    "opt-in: faster, but it changes the numerics of the adversarial game), no compile.",
]


def make_store(root: Path) -> Path:
    """Phantom volumes -> store -> 64x64 training patches (at least a few batches of 64)."""
    from octpipe.patches import write_patch_split
    from octpipe.pipeline import ingest
    from octpipe.testing.phantom_files import write_phantom_files
    from octpipe.testing.phantoms import make_phantom

    src = root / "src"
    for seed in (1, 2, 3):
        ph = make_phantom(np.random.default_rng(seed), shape=(4, 496, 256), spacing_mm=(0.24, 0.00387, 0.0113))
        ph = type(ph)(**{**ph.__dict__, "name": f"p{seed}"})
        write_phantom_files(ph, src, formats=["vol"])
    store = root / "s.zarr"
    ingest([src], store, workers=0)
    write_patch_split(store, "train", patch=64, k=48, seed=0, workers=0, chunk=256)
    return store


def config(variant: dict, args: argparse.Namespace) -> FAnoGANConfig:
    return FAnoGANConfig.from_dict({
        "model": {"latent_dim": 128, "dim": args.dim, "image_size": 64},
        "data": {"val_fraction": 0.0},
        "gan": {"batch_size": 64, "count": "generator", "iterations": args.warmup + args.iterations + 1,
                "log_every": 1, "checkpoint_every": 10**6, "snapshot_every": 0, "sample_every": 0},
        "runtime": {"device": "cpu", "seed": 0, "threads": args.threads, **variant},
    })


def run_variant(store: Path, name: str, args: argparse.Namespace, tmp: Path) -> dict:
    run = tmp / f"run-{name}"
    shutil.rmtree(run, ignore_errors=True)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.compile's own imports
        train_gan(store, run, config(VARIANTS[name], args))
    wall = time.perf_counter() - t0
    with open(run / "log.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    stamps = [float(r["seconds"]) for r in rows]
    # rows[i] ends outer iteration i+1; iteration 1 has no generator step, so the first full one is rows[1]
    per_iter = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    first = {k: float(rows[1][k]) for k in ("d_loss", "g_loss", "wasserstein", "gp")}
    return {"wall_s": round(wall, 2), "first_iteration_s": round(stamps[0], 3),
            "iteration_s": per_iter[args.warmup:], "warmup_s": per_iter[:args.warmup], "losses_iteration_2": first}


def data_stream_cost(store: Path) -> dict:
    source = PatchSource(store, "train")
    stream = BatchStream(source, np.arange(source.n), batch_size=64, d=Dist(), seed=0, stream=1, hflip=True,
                         window=8)
    stream.next()
    t0 = time.perf_counter()
    n = 200
    for _ in range(n):
        x = stream.next()
        torch.from_numpy(x).contiguous(memory_format=torch.channels_last)
    return {"ms_per_batch_of_64": round(1000 * (time.perf_counter() - t0) / n, 3), "batches": n,
            "patches_in_split": source.n}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--iterations", type=int, default=3, help="measured generator iterations per run")
    parser.add_argument("--warmup", type=int, default=1, help="generator iterations excluded per run")
    parser.add_argument("--dim", type=int, default=16)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = PyTorch default)")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "fanogan_train.json")
    args = parser.parse_args()

    names = [n for n in VARIANTS if not (args.no_compile and VARIANTS[n]["compile"])]
    tmp = Path(tempfile.mkdtemp(prefix="octpipe-bench-train-"))
    t_all = time.perf_counter()
    try:
        store = make_store(tmp)
        data = data_stream_cost(store)
        results: dict[str, dict] = {n: {"iteration_s": [], "runs": []} for n in names}
        order = []
        for r in range(args.rounds):
            for name in names if r % 2 == 0 else names[::-1]:
                order.append(name)
                out = run_variant(store, name, args, tmp)
                results[name]["iteration_s"] += out["iteration_s"]
                results[name]["runs"].append(out)
                print(f"round {r} {name}: {[round(s, 2) for s in out['iteration_s']]} s/iteration", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    ref = statistics.median(results["fp32-nchw"]["iteration_s"])
    variants = {}
    for name in names:
        s = results[name]["iteration_s"]
        med = statistics.median(s)
        runs = results[name]["runs"]
        entry = {**VARIANTS[name], "seconds_per_generator_iteration": round(med, 3),
                 "speedup_vs_fp32_nchw": round(ref / med, 2), "all_iteration_s": [round(x, 3) for x in s],
                 "losses_iteration_2_round_0": runs[0]["losses_iteration_2"]}
        if VARIANTS[name]["compile"]:
            entry["first_iterations_incl_compile_s"] = [[round(x, 1) for x in [r["first_iteration_s"],
                                                                                 *r["warmup_s"]]] for r in runs]
        variants[name] = entry
    best = min(variants, key=lambda n: variants[n]["seconds_per_generator_iteration"])
    result = {
        "benchmark": "fanogan_train",
        "what": "seconds per WGAN-GP generator iteration (1 G step + 5 critic steps with gradient penalty) of "
                "octpipe's train_gan on CPU, batch 64, 64x64, per runtime setting",
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "machine": {"cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
                    "torch": torch.__version__, "torch_threads": args.threads or torch.get_num_threads(),
                    "cpu_capability": torch.backends.cpu.get_cpu_capability(), "python": platform.python_version(),
                    "load_average_at_end": list(os.getloadavg()),
                    "note": "shared machine: other jobs ran at the same time; compare ratios, not absolutes"},
        "model": {"latent_dim": 128, "dim": args.dim, "image_size": 64, "batch_size": 64, "critic_iters": 5},
        "method": {"rounds": args.rounds, "measured_iterations_per_run": args.iterations,
                   "warmup_iterations_per_run": args.warmup, "statistic": "median over all measured iterations",
                   "run_order": order, "timing": "log.csv time stamps (one row per generator iteration)"},
        "data_stream": data,
        "variants": variants,
        "fastest": best,
        "notes": NOTES,
        "total_seconds": round(time.perf_counter() - t_all, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
