"""Fuzz the whole chain with mutated real B-scans; writes benchmarks/results/chain_fuzz.json.

Each of ``--n`` cases (``octpipe.testing.chain_fuzz.chain_cases``: a real B-scan from
../shared/data, mutated the way exports go wrong, written as a PNG/TIFF/JPEG/BMP/NIfTI
file or a folder of PNG B-scans) runs ``octpipe layers`` and ``octpipe ingest --workers
0``; ``octpipe patches --split test --workers 0`` follows every successful ingest; every
``--export-every``-th case, and every device-size volume (49 full-size B-scans, one
``blank_frame`` case in 20), also runs ``octpipe export --model models/fanogan-phantom
--device cpu --stride 64 --workers 0`` (the dearest command). Every command runs in its
own child process (forked from a preloaded forkserver) with a time limit and its peak
memory growth measured (VmHWM; see the module notes of ``octpipe.testing.chain_fuzz``).

Outcomes per command: ok (exit 0), error (exit 1 with a one-line ``error:``/``failed``
reason), traceback, hang, memory (peak growth > 2 x input + allowance), crash (the child
died) and bad_exit (any other exit). The last five are bugs; every one is listed in the
JSON with its case, the exact command and the stderr line, and the script exits 1 when
there is any. Also listed: ``ok`` results on inputs with no retina that carry no QC flag
(``unflagged``, not counted as bugs).

Usage: .venv/bin/python benchmarks/chain_fuzz.py [--n 700] [--seed 0] [--workers 2] [--export-every 3]
       [--data ../shared/data] [--out benchmarks/results/chain_fuzz.json]
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):  # one core per case: N cases at once
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from collections import Counter, defaultdict  # noqa: E402
from concurrent.futures import ThreadPoolExecutor, as_completed  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from octpipe import __version__  # noqa: E402
from octpipe.testing.chain_fuzz import (  # noqa: E402
    ALLOWANCE_BYTES,
    BAD_OUTCOMES,
    BIG_VOLUME_FRAMES,
    COMMANDS,
    MUTATIONS,
    OUTCOMES,
    REDUCE_PX,
    TIMEOUT_S,
    TIMEOUT_S_PER_MIB,
    chain_cases,
    chain_sources,
    run_case,
)


def _run_one(case: dict, folder: Path, with_export: bool) -> list[dict]:
    work = folder / f"case-{case['id']:05d}"
    try:
        results = [run_case(case, work, "layers"), run_case(case, work, "ingest")]
        if results[-1]["outcome"] == "ok":
            results.append(run_case(case, work, "patches"))
        if with_export:
            results.append(run_case(case, work, "export"))
        return results
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _source_state() -> dict[str, float]:
    """Modification times of octpipe's source files (the preloaded forkserver runs the code as it was at start)."""
    return {str(p.relative_to(ROOT)): p.stat().st_mtime for p in sorted((ROOT / "octpipe").rglob("*.py"))}


def _environment_state() -> dict[str, float]:
    """Modification times of the installed packages (top level of site-packages)."""
    import sysconfig

    site = Path(sysconfig.get_paths()["purelib"])
    return {p.name: p.stat().st_mtime for p in site.iterdir()} if site.is_dir() else {}


def _git(*args: str) -> str:
    import subprocess

    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def _case_line(case: dict) -> str:
    return f"{case['mutation']}{json.dumps(case['params'], sort_keys=True)} {case['format']} <- {case['source']}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=700, help="cases (each runs layers and ingest; default 700)")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the cases (default 0)")
    parser.add_argument("--workers", type=int, default=2, help="cases run at once (default 2)")
    parser.add_argument("--export-every", type=int, default=3, help="run export on every k-th case (default 3)")
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data", help="../shared/data")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "chain_fuzz.json")
    args = parser.parse_args()

    sources = chain_sources(args.data)
    if not sources:
        print(f"no real data under {args.data}", file=sys.stderr)
        return 2
    cases = list(chain_cases(args.seed, args.n, sources))
    state_at_start, env_at_start = _source_state(), _environment_state()
    git_head = _git("rev-parse", "HEAD").strip()
    git_dirty = [line[3:] for line in _git("status", "--porcelain", "--", "octpipe").splitlines() if line.strip()]
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    t_start = time.perf_counter()
    results: list[dict] = []
    lock = threading.Lock()
    done = 0
    with tempfile.TemporaryDirectory(prefix="octpipe-chain-fuzz-") as tmp, \
            ThreadPoolExecutor(max_workers=args.workers) as pool:
        futures = {pool.submit(_run_one, case, Path(tmp), case["id"] % args.export_every == 0
                               or case["n_frames"] >= BIG_VOLUME_FRAMES): case for case in cases}
        for fut in as_completed(futures):
            case = futures[fut]
            out = fut.result()
            with lock:
                results.extend(out)
                done += 1
                bad = [r for r in out if r["outcome"] in BAD_OUTCOMES]
                for r in bad:
                    print(f"  BAD {r['command']} {r['outcome']}: case {case['id']} {_case_line(case)}: "
                          f"{r['finding'][:200]}", flush=True)
                if done % 50 == 0 or done == len(cases):
                    print(f"{done}/{len(cases)} cases, {len(results)} runs, {time.perf_counter() - t_start:.0f} s",
                          flush=True)
    wall = time.perf_counter() - t_start
    state_at_end = _source_state()
    changed = sorted(k for k in state_at_start.keys() | state_at_end.keys()
                     if state_at_start.get(k) != state_at_end.get(k))
    env_at_end = _environment_state()
    env_changed = sorted(k for k in env_at_start.keys() | env_at_end.keys() if env_at_start.get(k) != env_at_end.get(k))
    if changed:
        print(f"warning: octpipe sources changed during the run (the cases ran the code as at the start): "
              f"{', '.join(changed)}", file=sys.stderr)
    if env_changed:
        print(f"warning: installed packages changed during the run (ImportError tracebacks may come from that): "
              f"{', '.join(env_changed)}", file=sys.stderr)
    by_id = {c["id"]: c for c in cases}

    per_command: dict[str, dict] = {}
    for command in COMMANDS:
        rows = [r for r in results if r["command"] == command and r["outcome"] != "not_run"]
        counts = Counter(r["outcome"] for r in rows)
        by_mutation: dict[str, Counter] = defaultdict(Counter)
        for r in rows:
            by_mutation[r["mutation"]][r["outcome"]] += 1
        peaks = [r["peak_memory_bytes"] for r in rows if r.get("peak_memory_bytes") is not None]
        fractions = [r["peak_memory_bytes"] / r["budget_bytes"] for r in rows if r.get("peak_memory_bytes") is not None]
        per_command[command] = {
            "cases": len(rows),
            "outcomes": {k: counts.get(k, 0) for k in OUTCOMES},
            "by_mutation": {k: dict(v) for k, v in sorted(by_mutation.items())},
            "seconds_total": round(sum(r["seconds"] for r in rows), 1),
            "seconds_max": round(max((r["seconds"] for r in rows), default=0.0), 2),
            "peak_memory_growth_max_bytes": max(peaks, default=0),
            "peak_memory_growth_median_bytes": sorted(peaks)[len(peaks) // 2] if peaks else 0,
            "peak_memory_max_budget_fraction": round(max(fractions, default=0.0), 3),
            "timeout_s": TIMEOUT_S[command],
            "timeout_s_per_input_mib": TIMEOUT_S_PER_MIB[command],
            "allowance_bytes": ALLOWANCE_BYTES[command],
        }
    failures = []
    for r in sorted(results, key=lambda r: (r["case"], COMMANDS.index(r["command"]))):
        if r["outcome"] not in BAD_OUTCOMES:
            continue
        case = by_id[r["case"]]
        failures.append({
            "case": r["case"], "command": r["command"], "outcome": r["outcome"], "finding": r["finding"],
            "stderr_line": r["stderr_line"], "time_limit_s": r["time_limit_s"],
            "argv": ["octpipe", *r["argv"]], "mutation": r["mutation"], "params": r["params"],
            "format": r["format"], "shape": r["shape"], "n_frames": r["n_frames"], "source": r["source"],
            "reduce": case["reduce"], "frame": case["frame"], "quality": case["quality"],
            "float_scale": case["float_scale"], "exit_code": r["exit_code"], "seconds": r["seconds"],
            "peak_memory_bytes": r["peak_memory_bytes"], "budget_bytes": r["budget_bytes"],
            "detail": r.get("detail", "")[-1500:],
        })
    # the distinct defects: one entry per (command, first stderr line with numbers blanked)
    signatures: dict[tuple[str, str, str], dict] = {}
    for f in failures:
        key = (f["command"], f["outcome"], re.sub(r"\d+(\.\d+)?", "N", f["finding"]))
        entry = signatures.setdefault(key, {"command": key[0], "outcome": key[1], "message": key[2], "count": 0,
                                            "mutations": Counter(), "example_case": f["case"]})
        entry["count"] += 1
        entry["mutations"][f["mutation"]] += 1
    distinct = [{**v, "mutations": dict(v["mutations"])} for v in sorted(signatures.values(),
                                                                         key=lambda v: -v["count"])]
    unflagged = [{"case": r["case"], "command": r["command"], "mutation": r["mutation"], "params": r["params"],
                  "shape": r["shape"], "source": r["source"]} for r in results if r.get("unflagged")]
    n_bad = len(failures)
    report = {
        "benchmark": "chain_fuzz",
        "octpipe_version": __version__,
        "python": platform.python_version(),
        "git_head": git_head,
        "octpipe_files_uncommitted": git_dirty,
        "octpipe_files_changed_during_run": changed,
        "packages_changed_during_run": env_changed,
        "started": started,
        "random_seed": args.seed,
        "cases": len(cases),
        "n_runs": sum(v["cases"] for v in per_command.values()),
        "workers": args.workers,
        "export_every": args.export_every,
        "reduce_px": REDUCE_PX,
        "sources": len(sources),
        "mutations": list(MUTATIONS),
        "bad_outcomes": n_bad,
        "outcome_meaning": {
            "ok": "exit 0", "error": "exit 1 with a one-line error (error: / failed ...)",
            "traceback": "a Traceback, 'error: unexpected ...' or an exception escaping main (bug)",
            "hang": "no result within the command's time limit, a fixed part plus a part per MiB of input (bug)",
            "memory": "peak resident growth > 2 x input (float32 pixels or file bytes) + allowance (bug)",
            "crash": "the child process died without a result (bug)",
            "bad_exit": "neither exit 0 nor exit 1 with an error line (bug)",
        },
        "commands": per_command,
        "distinct_failures": distinct,
        "failures": failures,
        "unflagged": unflagged,
        "runs_columns": ["case", "command", "mutation", "format", "outcome", "seconds", "peak_memory_mib", "input_kib"],
        "runs": [[r["case"], r["command"], r["mutation"], r["format"], r["outcome"], r["seconds"],
                  None if r.get("peak_memory_bytes") is None else round(r["peak_memory_bytes"] / 2**20, 1),
                  round(r["input_bytes"] / 1024, 1)] for r in sorted(results, key=lambda r: (r["case"],
                                                                                              COMMANDS.index(r["command"])))],
        "wall_s": round(wall, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(report, indent=1, default=str)
    # short lists on one line (one run a line)
    text = re.sub(r"\[\s+([^\[\]{}]*?)\s+\]", lambda m: "[" + " ".join(m.group(1).split()) + "]", text)
    args.out.write_text(text + "\n")
    for command, v in per_command.items():
        print(f"{command:8s} {v['cases']:5d} cases  {v['outcomes']}")
    print(f"{report['n_runs']} runs on {len(cases)} cases in {wall:.0f} s; {n_bad} bad -> {args.out}")
    return 1 if n_bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
