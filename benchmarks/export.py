"""Seconds per 49×496×512 volume for ``octpipe export`` (maps, pictures, NIfTI, DICOM, report), and peak RSS.

Two models, side by side in one run on the same volume:

- ``bundled``: ``models/fanogan-phantom`` (the trained reduced-width model the demo uses);
- ``paper``: the paper's networks (``pipelines/fanogan.yaml``, dim 64, 13.7 GFLOP per window),
  with untrained weights and a synthetic calibration (the cost does not depend on the weights).

Each model runs in its own subprocess (so peak RSS is its own) with ``--threads`` torch threads,
in interleaved rounds; the median seconds per volume are reported with the split between the
model (window scoring and merging, ``compute_anomaly``) and the rest (geometry, pictures, files).
The volume is a full-size phantom with fluid, ingested with the paper's preprocessing (stride 16
gives 3,185 windows).

Writes ``benchmarks/results/export.json`` and prints it.

Usage: .venv/bin/python benchmarks/export.py [--rounds 1] [--threads 2] [--models bundled,paper]
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _make_store(root: Path) -> tuple[Path, str]:
    import numpy as np

    from octpipe.pipeline import ingest
    from octpipe.store import volume_ids
    from octpipe.testing.phantom_files import write_phantom_files
    from octpipe.testing.phantoms import make_phantom, parse_lesion_specs

    ph = make_phantom(np.random.default_rng(7), lesions=parse_lesion_specs("irf:3,srf,ped"), laterality="OD")
    write_phantom_files(ph, root / "src", formats=["vol"])
    store = root / "s.zarr"
    ingest([root / "src"], store, workers=0)
    return store, volume_ids(store)[0]


def _paper_model_dir(root: Path) -> Path:
    import numpy as np

    from octpipe.models.fanogan.checkpoint import save_model
    from octpipe.models.fanogan.config import load_config
    from octpipe.models.fanogan.model import FAnoGANModel, build_networks
    from octpipe.models.fanogan.score import SCORE_NAMES, calibrate

    cfg = load_config(ROOT / "pipelines" / "fanogan.yaml")
    g, d, e = build_networks(cfg)
    rng = np.random.default_rng(0)
    cal = calibrate({k: rng.gamma(2.0, 0.05, 2000) for k in SCORE_NAMES}, source="synthetic (benchmark)")
    out = root / "paper-model"
    save_model(FAnoGANModel(g, d, e, cfg, calibration=cal), out / "model.pt")
    return out


def _child(store: str, vid: str, model_dir: str, threads: int, out: str) -> None:
    import torch

    from octpipe.export.anomaly import MapSettings, compute_anomaly
    from octpipe.export.run import export_volume
    from octpipe.models.fanogan.checkpoint import load_run
    from octpipe.store import read_prepared

    torch.set_num_threads(threads)
    model = load_run(model_dir)
    vol = read_prepared(store, vid)
    t0 = time.perf_counter()
    compute_anomaly(vol, model, MapSettings())  # warm-up (allocator, oneDNN kernels), not timed
    warm = time.perf_counter() - t0
    t0 = time.perf_counter()
    summary = export_volume(vol, model, out, settings=MapSettings())
    total = time.perf_counter() - t0
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"seconds": total, "seconds_model": summary["seconds_model"], "warmup_seconds": warm,
                      "n_windows": summary["n_windows"], "peak_rss_mb": rss_mb,
                      "precision": "auto"}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--models", default="bundled,paper")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "export.json")
    ap.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        store, vid, model_dir, threads, out = args.child
        _child(store, vid, model_dir, int(threads), out)
        return

    import torch

    from octpipe.models.fanogan.score import cpu_has_native_bf16, resolve_precision

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        store, vid = _make_store(root)
        dirs = {"bundled": ROOT / "models" / "fanogan-phantom", "paper": None}
        wanted = args.models.split(",")
        if "paper" in wanted:
            dirs["paper"] = _paper_model_dir(root)
        runs: dict[str, list[dict]] = {m: [] for m in wanted}
        for r in range(args.rounds):
            for m in wanted:
                out = root / f"out-{m}-{r}"
                proc = subprocess.run([sys.executable, __file__, "--child", str(store), vid, str(dirs[m]),
                                       str(args.threads), str(out)], capture_output=True, text=True, check=True)
                runs[m].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    results = {}
    for m, rs in runs.items():
        results[m] = {
            "seconds_per_volume": statistics.median(x["seconds"] for x in rs),
            "seconds_model": statistics.median(x["seconds_model"] for x in rs),
            "seconds_other": statistics.median(x["seconds"] - x["seconds_model"] for x in rs),
            "windows_per_second": statistics.median(x["n_windows"] / x["seconds_model"] for x in rs),
            "n_windows": rs[0]["n_windows"], "peak_rss_mb": max(x["peak_rss_mb"] for x in rs), "runs": rs,
        }
    if "bundled" in results and "paper" in results:
        results["paper_over_bundled_seconds"] = (results["paper"]["seconds_per_volume"]
                                                 / results["bundled"]["seconds_per_volume"])
    report = {
        "benchmark": "export",
        "what": "seconds per 49x496x512 volume for export_volume (maps + pictures + NIfTI + DICOM + report), "
                "stride 16, gaussian weighting",
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "machine": {"cpu": platform.machine(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
                    "threads": args.threads, "native_bf16": cpu_has_native_bf16(),
                    "precision_auto": resolve_precision("auto", torch.device("cpu"), training=False),
                    "load_average_at_end": list(os.getloadavg()),
                    "note": "shared machine: other jobs may run at the same time; compare ratios"},
        "rounds": args.rounds,
        "results": results,
        "targets": {"bundled_seconds_per_volume_2_cores": 60, "paper_seconds_per_volume_h200": 2},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
