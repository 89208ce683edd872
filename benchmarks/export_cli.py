"""Seconds for ``octpipe export FILE`` of one 49×496×512 volume, end to end, against another checkout.

``octpipe export`` is run as a user runs it (a new process: imports, reading, segmentation,
flattening, the model, every output), on a phantom ``.vol`` with fluid written by octpipe's own
writer, with the bundled ``models/fanogan-phantom``. Each round runs this checkout and, with
``--baseline DIR``, another checkout of octpipe (e.g. a worktree of an older commit) one after
the other, so both see the same load; the ratio is taken per round. ``--avx2`` runs both with
``ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2`` (a CPU without AVX-512). The NIfTI maps of
the two checkouts are compared (max absolute difference of each map).

Writes ``benchmarks/results/export_cli.json`` and prints it.

Usage: .venv/bin/python benchmarks/export_cli.py [--baseline DIR] [--rounds 2] [--avx2]
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

AVX2_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
MAPS = ("anomaly.nii.gz", "window-score.nii.gz", "source.nii.gz")


def _phantom(root: Path) -> Path:
    import numpy as np

    from octpipe.testing.phantom_files import write_phantom_files
    from octpipe.testing.phantoms import make_phantom, parse_lesion_specs

    ph = make_phantom(np.random.default_rng(7), lesions=parse_lesion_specs("irf:3,srf,ped"), laterality="OD")
    write_phantom_files(ph, root / "src", formats=["vol"])
    return next((root / "src").glob("*.vol"))


def _run(checkout: Path, src: Path, out: Path, env: dict[str, str]) -> dict:
    """One ``octpipe export`` in a new process with ``checkout`` first on the path; seconds and summary."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-c", "from octpipe.cli import main; raise SystemExit(main())", "--no-progress",
           "export", str(src), "--model", str(ROOT / "models" / "fanogan-phantom"), "-o", str(out)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env={**env, "PYTHONPATH": str(checkout)}, cwd=str(checkout),
                          capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"export failed in {checkout}: {proc.stderr.strip()[-400:]}")
    summary = json.loads(next(out.glob("*/summary.json")).read_text())
    return {"seconds": round(seconds, 2), "seconds_model": summary.get("seconds_model"),
            "seconds_volume": summary.get("seconds"), "n_windows": summary.get("n_windows")}


def _map_differences(a: Path, b: Path) -> dict[str, float]:
    import nibabel as nib
    import numpy as np

    out = {}
    for name in MAPS:
        fa, fb = next(a.glob(f"*/{name}")), next(b.glob(f"*/{name}"))
        va, vb = np.asarray(nib.load(fa).dataobj), np.asarray(nib.load(fb).dataobj)
        out[name] = float(np.abs(va.astype(np.float64) - vb).max()) if va.shape == vb.shape else float("nan")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline", type=Path, default=None, help="another octpipe checkout to compare with")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--avx2", action="store_true", help="run both with the AVX2-only environment")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "export_cli.json")
    args = ap.parse_args()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", *AVX2_ENV)}
    if args.avx2:
        env.update(AVX2_ENV)
    checkouts = {"this": ROOT, **({"baseline": args.baseline.resolve()} if args.baseline else {})}
    runs: dict[str, list[dict]] = {k: [] for k in checkouts}
    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        src = _phantom(root)
        for r in range(args.rounds):
            order = list(checkouts) if r % 2 == 0 else list(reversed(checkouts))
            for name in order:
                runs[name].append(_run(checkouts[name], src, root / f"out-{name}", env))
                print(name, runs[name][-1], flush=True)
        diffs = _map_differences(root / "out-this", root / "out-baseline") if args.baseline else None
    result = {
        "benchmark": "export_cli",
        "what": "wall seconds of `octpipe export FILE` (new process, one 49x496x512 phantom .vol with fluid, "
                "bundled models/fanogan-phantom, every output), this checkout and a baseline in alternate order",
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "command": " ".join([".venv/bin/python", "benchmarks/export_cli.py", *sys.argv[1:]]),
        "machine": {"cpu": platform.machine(), "cpu_count": os.cpu_count(), "python": platform.python_version(),
                    "env": {k: env.get(k) for k in (*AVX2_ENV, "OMP_WAIT_POLICY")},
                    "load_average_at_start": list(load_start), "load_average_at_end": list(os.getloadavg())},
        "checkouts": {k: str(v) for k, v in checkouts.items()},
        "runs": runs,
        "median_seconds": {k: statistics.median(r["seconds"] for r in v) for k, v in runs.items()},
        "median_seconds_model": {k: statistics.median(r["seconds_model"] for r in v) for k, v in runs.items()},
    }
    if args.baseline:
        result["baseline_over_this_per_round"] = [round(b["seconds"] / t["seconds"], 3)
                                                  for t, b in zip(runs["this"], runs["baseline"], strict=True)]
        result["max_abs_map_difference"] = diffs
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
