"""Fuzz every reader with N mutated files and count the outcomes; writes benchmarks/results/fuzz.json.

Seeds are small phantoms written by octpipe's own writers (.vol, E2E, XML export, DICOM,
NIfTI, PNG, TIFF) and the real vendor files in ../shared/data/real (Spectralis .vol,
E2E, Topcon .fda/.fds, a Zeiss PNG). Each case applies one random mutation (truncation,
usually at a header boundary; bit flips, mostly in the first 4 KiB; an extreme value in
a size field; NaN/Inf in float pixels; a zeroed or 0xFF run), then runs format detection
and octpipe.io.read_volumes under a time limit, measuring the peak allocation
(tracemalloc). Outcomes are defined in octpipe.testing.fuzz; ``crash``, ``hang``,
``oversize`` and ``bad_volume`` are bugs, and each is listed with its mutation.

Usage: python benchmarks/fuzz.py [--n 1000] [--seed 0] [--out benchmarks/results/fuzz.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import random
import sys
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from octpipe import __version__  # noqa: E402
from octpipe.testing.fuzz import (  # noqa: E402
    BAD_OUTCOMES,
    OUTCOMES,
    apply_mutation,
    baseline_peak,
    build_seeds,
    random_mutation,
    run_case,
)

REAL = ROOT.parent / "shared" / "data" / "real"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000, help="cases per reader (default 1000)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per case before it counts as a hang")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "fuzz.json")
    args = parser.parse_args()
    warnings.simplefilter("ignore")  # damaged files make Pillow/pydicom/nibabel warn; outcomes are what count
    logging.disable(logging.CRITICAL)  # tifffile logs every damaged tag

    rng = random.Random(args.seed)
    t_start = time.perf_counter()
    report: dict[str, object] = {}
    with tempfile.TemporaryDirectory(prefix="octpipe-fuzz-") as tmp:
        seeds = build_seeds(Path(tmp) / "seeds", real_dir=REAL)
        case_dir = Path(tmp) / "cases"
        case_dir.mkdir()
        for reader, group in seeds.items():
            if not group:
                report[reader] = {"cases": 0, "note": "no seed files (real data missing)"}
                continue
            budgets = {s.name: 2 * max(baseline_peak(s), 4 << 20) for s in group}
            counts: Counter[str] = Counter()
            by_mutation: dict[str, Counter[str]] = {}
            bugs: list[dict[str, object]] = []
            max_peak, max_seconds = 0, 0.0
            t0 = time.perf_counter()
            for _ in range(args.n):
                seed = rng.choice(group)
                mutation = random_mutation(seed, rng)
                out = run_case(seed, apply_mutation(seed, mutation), folder=case_dir, timeout_s=args.timeout,
                               budget_bytes=budgets[seed.name])
                counts[out.kind] += 1
                by_mutation.setdefault(mutation.kind, Counter())[out.kind] += 1
                max_peak = max(max_peak, out.peak_bytes)
                max_seconds = max(max_seconds, out.seconds)
                if out.kind in BAD_OUTCOMES and len(bugs) < 50:
                    bugs.append({"seed": seed.name, "mutation": mutation.describe()[:200], "outcome": out.kind,
                                 "detail": out.detail})
            report[reader] = {
                "cases": sum(counts.values()),
                "outcomes": {k: counts.get(k, 0) for k in OUTCOMES},
                "by_mutation": {k: dict(v) for k, v in sorted(by_mutation.items())},
                "seeds": [{"name": s.name, "format": s.format, "bytes": len(s.data),
                           "budget_bytes": budgets[s.name]} for s in group],
                "max_peak_bytes": max_peak,
                "max_case_seconds": round(max_seconds, 3),
                "seconds": round(time.perf_counter() - t0, 1),
                "bugs": bugs,
            }
            print(f"{reader:13s} {dict(counts)}  ({report[reader]['seconds']} s)", flush=True)
    total = sum(int(r["cases"]) for r in report.values())  # type: ignore[index]
    n_bad = sum(sum(r.get("outcomes", {}).get(k, 0) for k in BAD_OUTCOMES) for r in report.values())  # type: ignore[union-attr]
    result = {
        "benchmark": "fuzz",
        "octpipe_version": __version__,
        "python": platform.python_version(),
        "cases_per_reader": args.n,
        "random_seed": args.seed,
        "total_cases": total,
        "bad_outcomes": n_bad,
        "outcome_meaning": {
            "ok": "a valid volume was read", "error": "OctpipeError raised by the reader",
            "error_wrapped": "OctpipeError made by read_volumes from an unforeseen reader exception",
            "crash": "another exception (bug)", "hang": f"no result within {args.timeout} s (bug)",
            "oversize": "peak allocation above twice the intact file's (bug)",
            "bad_volume": "read succeeded with an invalid volume (bug)",
        },
        "readers": report,
        "wall_s": round(time.perf_counter() - t_start, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{total} cases, {n_bad} bad outcomes -> {args.out}")
    return 1 if n_bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
