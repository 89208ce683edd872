"""Load: ingest N full-size phantom .vol files with 2 workers under a 2 GB per-worker memory limit.

Runs ``octpipe ingest SRC -o STORE --workers 2 --memory-limit 2GB`` as a subprocess and
records wall time, volumes per minute, peak RSS of every Dask worker process (sampled
with psutil every 0.2 s, plus VmHWM from /proc while it lives) and whether anything was
lost (every input complete in the store, or recorded in the manifest). Writes
benchmarks/results/load.json.

One phantom (49 x 496 x 512, Spectralis-like) is generated; the N inputs are copies whose
SLO bytes differ (so each has its own sha256 and volume id) and whose B-scans are equal.

Usage: python benchmarks/load.py [--n 200] [--workers 2] [--memory-limit 2GB] [--out ...]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from octpipe import __version__  # noqa: E402


def _hwm_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def make_inputs(src: Path, n: int) -> float:
    """Write one full-size phantom, then n copies differing in their SLO bytes; return seconds taken."""
    from octpipe.io.writers.heyex_vol import write_heyex_vol
    from octpipe.testing.phantoms import make_phantom

    t0 = time.perf_counter()
    src.mkdir(parents=True, exist_ok=True)
    ph = make_phantom(np.random.default_rng(0), shape=(49, 496, 512), spacing_mm=(0.12, 0.00387, 0.0113))
    base = write_heyex_vol(src / ".base.vol", ph.data, spacing_mm=ph.spacing_mm, laterality=ph.laterality,
                           layers={"ILM": ph.ilm, "BM": ph.bm})
    raw = bytearray(base.read_bytes())
    for i in range(n):
        raw[2048:2056] = i.to_bytes(8, "little")  # first SLO pixels: a distinct file, the same B-scans
        (src / f"vol{i:04d}.vol").write_bytes(raw)
    base.unlink()
    return time.perf_counter() - t0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200, help="number of volumes (default 200)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--memory-limit", default="2GB")
    parser.add_argument("--note", default="", help="free text stored in the JSON (e.g. why N is smaller)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "load.json")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="octpipe-load-") as tmp:
        src, store = Path(tmp) / "src", Path(tmp) / "load.zarr"
        gen_s = make_inputs(src, args.n)
        input_bytes = sum(p.stat().st_size for p in src.iterdir())
        cmd = [sys.executable, "-c", "from octpipe.cli import main; main()", "--no-progress", "ingest", str(src),
               "-o", str(store), "--workers", str(args.workers), "--memory-limit", args.memory_limit]
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        parent = psutil.Process(proc.pid)
        peaks: dict[int, dict[str, object]] = {}
        parent_peak = 0
        while proc.poll() is None:
            try:
                parent_peak = max(parent_peak, parent.memory_info().rss)
                for child in parent.children(recursive=True):
                    try:
                        cmdline = " ".join(child.cmdline())
                        rss = child.memory_info().rss
                    except (psutil.NoSuchProcess, psutil.AccessDenied):
                        continue
                    rec = peaks.setdefault(child.pid, {"pid": child.pid, "peak_rss_bytes": 0, "vm_hwm_bytes": 0,
                                                       "kind": "worker" if "spawn_main" in cmdline
                                                       or "multiprocessing" in cmdline else "other"})
                    rec["peak_rss_bytes"] = max(int(rec["peak_rss_bytes"]), rss)
                    rec["vm_hwm_bytes"] = max(int(rec["vm_hwm_bytes"]), _hwm_bytes(child.pid))
            except psutil.NoSuchProcess:
                break
            time.sleep(0.2)
        out, err = proc.communicate()
        wall = time.perf_counter() - t0

        from octpipe.manifest import load_manifest
        from octpipe.store import complete_volumes

        complete = complete_volumes(store)
        rows = load_manifest(store.with_name(store.stem + "-manifest.csv"))  # the one with readable paths
        recorded = {r["path"] for r in rows}
        names = sorted(p.name for p in src.iterdir())
        missing = [n for n in names if not any(r.endswith(n) for r in recorded)]
        status = {s: sum(r["status"] == s for r in rows) for s in ("ok", "skipped", "failed")}
        workers = sorted(peaks.values(), key=lambda r: -int(r["peak_rss_bytes"]))
        limit_bytes = int(float(args.memory_limit.upper().removesuffix("GB")) * 1e9) \
            if args.memory_limit.upper().endswith("GB") else None
        big = [w for w in workers if int(w["peak_rss_bytes"]) > 200e6]  # the Dask workers doing the reads
        result = {
            "benchmark": "load",
            "octpipe_version": __version__,
            "python": platform.python_version(),
            "cpu_count": os.cpu_count(),
            "load_average_at_end": os.getloadavg(),
            "n_volumes": args.n,
            "note": args.note,
            "shape": [49, 496, 512],
            "input_bytes": input_bytes,
            "workers": args.workers,
            "memory_limit": args.memory_limit,
            "command": " ".join(["octpipe", *cmd[4:]]),
            "exit_code": proc.returncode,
            "generate_inputs_s": round(gen_s, 1),
            "wall_s": round(wall, 1),
            "volumes_per_min": round(60 * len(complete) / wall, 2) if wall else None,
            "complete_volumes": len(complete),
            "manifest_status": status,
            "inputs_not_recorded": missing,
            "nothing_lost": len(complete) + status["failed"] == args.n and not missing,
            "peak_rss_per_process": workers,
            "max_worker_peak_rss_bytes": max((int(w["peak_rss_bytes"]) for w in big), default=0),
            "max_worker_vm_hwm_bytes": max((int(w["vm_hwm_bytes"]) for w in big), default=0),
            "worker_peak_below_limit": limit_bytes is None
            or all(int(w["peak_rss_bytes"]) < limit_bytes for w in workers),
            "parent_peak_rss_bytes": parent_peak,
            "stdout_tail": out.strip().splitlines()[-1:] if out.strip() else [],
            "stderr_tail": err.strip().splitlines()[-5:],
        }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("n_volumes", "wall_s", "volumes_per_min", "complete_volumes",
                                              "nothing_lost", "max_worker_peak_rss_bytes", "exit_code")}))
    return 0 if result["nothing_lost"] and proc.returncode == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
