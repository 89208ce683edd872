"""Ingest throughput, scaling and memory: phantom Spectralis .vol files into a fresh store.

Generates ``--n`` seeded phantom ``.vol`` volumes (49x496x512 by default; cached in
``--data`` so reruns reuse them; generation is not timed), then runs
:func:`octpipe.pipeline.ingest` into a fresh store for ``workers`` = 1 and 2 (a
``dask.distributed`` LocalCluster of worker processes, one thread each) and ``workers=0``
(in-process, no Dask) as a reference. Each configuration runs ``--repeats`` times in
alternating order (1, 2, 0, 2, 1, 0, ...) and the median wall time is used, so that
drift from other load on the machine hits every configuration alike.

The LocalCluster is started by this script (same settings as ``ingest`` uses: processes,
one thread per worker, ``memory_limit="auto"``) and passed as ``scheduler=``, so the
timed wall is ``ingest()`` itself (discovery, tasks, manifest) and the worker PIDs are
known: a background thread samples their RSS every ``--interval`` s. Cluster start-up
(+ importing octpipe on the workers) is timed separately and reported beside it, as is
an end-to-end figure (start-up + ingest + shutdown), which is what ``ingest(workers=N)``
costs when it starts its own cluster.

Each run's store is checked (manifest has ``--n`` ``ok`` rows and no failure; one volume
read back is 49x496x512 -- or, with column downsampling, comes from a 49x496x512 source
and matches its ``shape`` attr -- finite and within [-1, 1]); the script fails loudly
otherwise. CPU is accounted too (user/system seconds and minor page faults of the task
processes, and how busy the rest of the machine was), to tell Dask overhead from
contention.

A cProfile of ``ingest_one`` on one volume in-process (cumulative time of each stage:
hashing, reading, preprocessing, zarr writing) shows where a volume's time goes.

Writes ``benchmarks/results/ingest.json`` and prints it.

Usage: .venv/bin/python benchmarks/ingest.py [--n 20] [--repeats 2] [--data DIR] [--out FILE]
"""

from __future__ import annotations

import argparse
import cProfile
import csv
import datetime as _dt
import io
import json
import os
import platform
import pstats
import resource
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from octpipe.testing.phantoms import DEFAULT_SHAPE, make_cohort  # noqa: E402

#: Targets from the issue.
TARGET_VOLUMES_PER_MIN_PER_CORE = 20.0
TARGET_SCALING_EFFICIENCY_2 = 0.80
TARGET_RSS_PER_WORKER_MB = 1500.0

MB = 1024 * 1024


class RssSampler:
    """Sample the RSS of some PIDs every ``interval`` s from a background thread."""

    def __init__(self, pids: list[int], interval: float = 0.1) -> None:
        self.procs = {pid: psutil.Process(pid) for pid in pids}
        self.interval = interval
        self.peak = dict.fromkeys(pids, 0)
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _sample(self) -> None:
        for pid, proc in self.procs.items():
            try:
                rss = proc.memory_info().rss
            except psutil.Error:
                continue
            if rss > self.peak[pid]:
                self.peak[pid] = rss
        self.samples += 1

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def peak_mb(self) -> dict[int, float]:
        return {pid: round(v / MB, 1) for pid, v in self.peak.items()}


def rss_mb(pid: int) -> float:
    return round(psutil.Process(pid).memory_info().rss / MB, 1)


def ensure_data(data: Path, n: int, seed: int, shape: tuple[int, int, int]) -> tuple[list[Path], float | None]:
    """The ``n`` phantom .vol files in ``data``, generated (untimed for the benchmark) when missing."""
    from octpipe.testing.phantom_files import write_cohort

    names = [f"phantom-{k:04d}.vol" for k in range(n)]
    stamp = data / "benchmark-cohort.json"
    want = {"n": n, "seed": seed, "shape": list(shape)}
    paths = [data / name for name in names]
    if stamp.exists():  # phantom k does not depend on n, so a larger cached cohort serves too
        have = json.loads(stamp.read_text())
        if (have["seed"], have["shape"]) == (seed, list(shape)) and have["n"] >= n and all(p.exists() for p in paths):
            return paths, None
    if data.exists():
        shutil.rmtree(data)
    data.mkdir(parents=True)
    t0 = time.perf_counter()
    print(f"generating {n} phantoms {shape} (seed {seed}) in {data} ...", file=sys.stderr, flush=True)
    write_cohort(make_cohort(n, seed=seed, shape=shape), data, formats=["vol"])
    seconds = time.perf_counter() - t0
    stamp.write_text(json.dumps(want))
    return paths, round(seconds, 1)


def check_store(store: Path, n: int, shape: tuple[int, int, int]) -> None:
    """Fail loudly unless the manifest has ``n`` ok rows and a volume reads back complete.

    The image must be ``shape`` (49x496x512), or, in the preprocessing layout where the
    columns are downsampled, come from a ``shape`` source (attr ``source_shape``) and
    match the group's own ``shape`` attr with the same B-scans and rows.
    """
    from octpipe.store import read_volume_group

    with open(store / "manifest.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    ok = [r for r in rows if r["status"] == "ok"]
    bad = [r for r in rows if r["status"] != "ok"]
    if len(ok) != n or bad:
        raise SystemExit(f"FAIL: {store}: manifest has {len(ok)} ok rows (want {n}); others: "
                         f"{[(r['path'], r['status'], r['error']) for r in bad]}")
    vid = ok[len(ok) // 2]["volume_id"]
    arrays, attrs = read_volume_group(store, vid)
    image = arrays["image"]
    problems = []
    if "source_shape" in attrs:
        if tuple(attrs["source_shape"]) != shape:
            problems.append(f"source_shape {attrs['source_shape']} != {shape}")
        if image.shape != tuple(attrs["shape"]) or image.shape[:2] != shape[:2]:
            problems.append(f"image shape {image.shape} != attr shape {attrs['shape']} (source {shape})")
    elif image.shape != shape:
        problems.append(f"shape {image.shape} != {shape}")
    for name in ("image", "flat"):
        if name not in arrays:
            continue
        a = arrays[name]
        if not np.isfinite(a).all():
            problems.append(f"{name}: non-finite values")
        elif a.min() < -1 or a.max() > 1:
            problems.append(f"{name}: values in [{a.min()}, {a.max()}], not within [-1, 1]")
    if attrs.get("status") != "complete":
        problems.append(f"status {attrs.get('status')!r}")
    if problems:
        raise SystemExit(f"FAIL: {store}: volume {vid}: {'; '.join(problems)}")


def task_seconds(store: Path) -> list[float]:
    with open(store / "manifest.csv", newline="") as fh:
        return [float(r["seconds"]) for r in csv.DictReader(fh) if r["status"] == "ok"]


def warm_worker() -> dict:
    """Import what a task imports, so the timed run does not pay for it; say who we are."""
    import importlib

    import octpipe

    for mod in ("octpipe.io.heyex_vol", "octpipe.pipeline", "octpipe.preprocess.intensity",
                "octpipe.preprocess.prepare", "octpipe.store"):
        try:
            importlib.import_module(mod)
        except ImportError:
            pass
    return {"pid": os.getpid(), "octpipe": str(Path(octpipe.__file__).parent),
            "MALLOC_TRIM_THRESHOLD_": os.environ.get("MALLOC_TRIM_THRESHOLD_")}


_CLK_TCK = os.sysconf("SC_CLK_TCK")


def proc_counters(pids: list[int]) -> dict[str, float]:
    """Summed user and system CPU seconds and minor page faults of ``pids``."""
    user = system = 0.0
    minflt = 0
    for pid in pids:
        t = psutil.Process(pid).cpu_times()
        user += t.user
        system += t.system
        with open(f"/proc/{pid}/stat") as fh:
            minflt += int(fh.read().rsplit(")", 1)[1].split()[7])
    return {"user": user, "sys": system, "minflt": minflt}


def machine_busy_s() -> float:
    """CPU seconds the whole machine has been busy (all cores, /proc/stat)."""
    with open("/proc/stat") as fh:
        f = [int(x) for x in fh.readline().split()[1:]]
    idle = f[3] + f[4]  # idle + iowait
    return (sum(f[:8]) - idle) / _CLK_TCK


def run_once(workers: int, sources: list[Path], work: Path, tag: str, n: int, interval: float) -> dict:
    """One timed ingest into a fresh store; returns timings, CPU accounting and RSS peaks."""
    from octpipe.pipeline import ingest

    store = work / f"store-{tag}.zarr"
    manifest = work / f"manifest-{tag}.csv"
    if store.exists():
        shutil.rmtree(store)
    me = os.getpid()
    out: dict[str, object] = {"workers": workers}
    client = cluster = None
    if workers == 0:
        pids = [me]
        out["rss_before_mb"] = rss_mb(me)
    else:
        from dask.distributed import Client, LocalCluster

        t0 = time.perf_counter()
        cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None,
                               memory_limit="auto", silence_logs=40)
        client = Client(cluster)
        client.wait_for_workers(workers)
        info = sorted(client.run(warm_worker).values(), key=lambda d: d["pid"])
        pids = [d["pid"] for d in info]
        out["cluster_start_s"] = time.perf_counter() - t0
        out["rss_idle_mb"] = [rss_mb(p) for p in pids]
        out["worker_octpipe"] = sorted({d["octpipe"] for d in info})
        out["worker_MALLOC_TRIM_THRESHOLD_"] = sorted({str(d["MALLOC_TRIM_THRESHOLD_"]) for d in info})
    try:
        with RssSampler(pids, interval) as sampler:
            c0, m0, b0 = proc_counters(pids), (proc_counters([me]) if workers else None), machine_busy_s()
            t1 = time.perf_counter()
            if workers == 0:
                result = ingest(sources, store, workers=0, manifest=manifest)
            else:
                result = ingest(sources, store, scheduler=cluster.scheduler_address, manifest=manifest)
            out["ingest_s"] = wall = time.perf_counter() - t1
            c1, m1, b1 = proc_counters(pids), (proc_counters([me]) if workers else None), machine_busy_s()
    finally:
        if cluster is not None:
            t2 = time.perf_counter()
            client.close()
            cluster.close()
            out["cluster_close_s"] = time.perf_counter() - t2
    # CPU of the processes that run the tasks (workers, or this process for workers=0).
    out["task_cpu_user_s"] = c1["user"] - c0["user"]
    out["task_cpu_sys_s"] = c1["sys"] - c0["sys"]
    out["task_minflt_per_volume"] = (c1["minflt"] - c0["minflt"]) // n
    ours = out["task_cpu_user_s"] + out["task_cpu_sys_s"]
    if workers:
        out["main_cpu_s"] = (m1["user"] + m1["sys"]) - (m0["user"] + m0["sys"])  # scheduler + client + sampler
        ours += out["main_cpu_s"]
    out["cores_busy_ours"] = ours / wall
    # Everything else that was busy meanwhile: other processes and kernel threads (writeback ...).
    out["cores_busy_other"] = max(0.0, (b1 - b0) - ours) / wall
    if workers == 0:
        out["peak_rss_mb"] = sampler.peak_mb()[me]
    else:
        peaks = sampler.peak_mb()
        out["peak_rss_mb_per_worker"] = [peaks[p] for p in pids]
        out["end_to_end_s"] = out["cluster_start_s"] + out["ingest_s"] + out["cluster_close_s"]
    out["rss_samples"] = sampler.samples
    if not result.ok:
        raise SystemExit(f"FAIL: ingest workers={workers} reported failures: {result.counts}")
    check_store(store, n, DEFAULT_SHAPE)
    secs = task_seconds(store)
    out["task_s_median"] = statistics.median(secs)
    out["task_s_sum"] = sum(secs)
    shutil.rmtree(store)
    manifest.unlink(missing_ok=True)
    for key, value in list(out.items()):
        if isinstance(value, float):
            out[key] = round(value, 3)
        elif isinstance(value, list):
            out[key] = [round(v, 3) if isinstance(v, float) else v for v in value]
    return out


#: Functions whose cumulative time is reported as a stage of ingest_one (when present).
STAGES = ("file_sha256", "read_volumes", "_load_mask", "prepare_volume", "to_display", "normalize_volume",
          "downsample_columns", "_find_layers", "flatten_map", "flatten_image", "downsample_labels",
          "write_volume")


def profile_one(source: Path, work: Path) -> dict:
    """Where one volume's time goes, in-process (workers=0): cProfile of ingest_one."""
    from octpipe.inputs import discover_inputs
    from octpipe.pipeline import ingest_one
    from octpipe.store import open_store, store_salt

    (item,), _ = discover_inputs([source])
    store = work / "store-profile.zarr"

    def fresh() -> str:
        if store.exists():
            shutil.rmtree(store)
        open_store(store)
        return store_salt(store)

    walls = []
    for _ in range(3):  # the first also warms up
        salt = fresh()
        t = time.perf_counter()
        rows = ingest_one(item, str(store), salt, {})
        walls.append(time.perf_counter() - t)
        assert rows[0]["status"] == "ok", rows
    stored = sum(f.stat().st_size for f in (store / "volumes").rglob("*") if f.is_file())
    salt = fresh()
    prof = cProfile.Profile()
    t = time.perf_counter()
    prof.enable()
    rows = ingest_one(item, str(store), salt, {})
    prof.disable()
    wall = time.perf_counter() - t
    shutil.rmtree(store)
    assert rows[0]["status"] == "ok", rows
    stats = pstats.Stats(prof).stats
    total = max(ct for (_f, _l, fn), (_cc, _nc, _tt, ct, _c) in stats.items() if fn == "ingest_one")
    stages: dict[str, float] = {}
    for (file, _line, func), (_cc, _nc, _tt, ct, _callers) in stats.items():
        if func in STAGES and "octpipe" in file:
            stages[func] = round(max(stages.get(func, 0.0), ct), 3)
    hashing = sum(tt for (_f, _l, fn), (_cc, _nc, tt, _ct, _c) in stats.items() if "_hashlib.HASH" in fn)
    stages["sha256_all_passes(_hashlib update)"] = round(hashing, 3)
    # Time waiting on zarr's event loop (encode/compress + file writes run there, in other threads).
    waits = sum(tt for (_f, _l, fn), (_cc, _nc, tt, _ct, _c) in stats.items() if "acquire" in fn)
    stages["waiting_on_zarr_threads(lock acquire)"] = round(waits, 3)
    top = []
    for (file, line, func), (_cc, nc, tt, ct, _callers) in sorted(stats.items(), key=lambda kv: -kv[1][2])[:15]:
        top.append({"function": f"{Path(file).name}:{line}({func})", "calls": nc, "tottime_s": round(tt, 3),
                    "cumtime_s": round(ct, 3)})
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("cumulative").print_stats(30)
    return {
        "volume": Path(item.path).name,
        "file_mb": round(Path(item.path).stat().st_size / MB, 1),
        "stored_mb": round(stored / MB, 1),
        "ingest_one_wall_s": [round(w, 3) for w in walls],
        "ingest_one_wall_s_under_cprofile": round(wall, 3),
        "stage_cumtime_s": dict(sorted(stages.items(), key=lambda kv: -kv[1])),
        "stage_share_of_ingest_one": {k: round(v / total, 3) for k, v in stages.items()},
        "cprofile_top_by_tottime": top,
        "cprofile_cumulative_text": text.getvalue().splitlines()[:70],
    }


def provenance(label: str | None) -> dict[str, object]:
    """Which octpipe was measured: its path and, when it is a git checkout, commit and dirty files."""
    import subprocess

    import octpipe

    pkg = Path(octpipe.__file__).resolve().parent
    out: dict[str, object] = {"octpipe_path": str(pkg)}

    def git(*cmd: str) -> str | None:
        try:
            r = subprocess.run(["git", "-C", str(pkg), *cmd], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return r.stdout.strip() if r.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit:
        out["git_commit"] = commit
        dirty = git("status", "--porcelain", "--", ".")
        out["octpipe_dirty_files"] = dirty.splitlines() if dirty else []
    if label:
        out["label"] = label
    return out


def versions() -> dict[str, str]:
    import dask
    import distributed
    import numcodecs
    import zarr

    from octpipe import __version__

    return {"python": platform.python_version(), "numpy": np.__version__, "dask": dask.__version__,
            "distributed": distributed.__version__, "zarr": zarr.__version__, "numcodecs": numcodecs.__version__,
            "psutil": psutil.__version__, "octpipe": __version__}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20, help="number of phantom volumes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "octpipe-bench-ingest",
                        help="phantom .vol cache (reused when it matches --n/--seed)")
    parser.add_argument("--work", type=Path, default=None, help="folder for the temporary stores (default: temp)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "ingest.json")
    parser.add_argument("--interval", type=float, default=0.1, help="RSS sampling interval, s")
    parser.add_argument("--no-profile", action="store_true", help="skip the one-volume profile")
    parser.add_argument("--label", default=None,
                        help="note stored with the result (e.g. the commit of an exported, non-git octpipe tree)")
    args = parser.parse_args()

    sources, gen_s = ensure_data(args.data, args.n, args.seed, DEFAULT_SHAPE)
    work = Path(tempfile.mkdtemp(prefix="octpipe-bench-ingest-", dir=args.work))
    load_before = os.getloadavg()
    try:
        # Warm up this process (imports, page cache of the inputs) without timing.
        from octpipe.pipeline import ingest

        warm = work / "store-warmup.zarr"
        ingest(sources[:1], warm, workers=0, manifest=work / "warmup.csv")
        shutil.rmtree(warm)
        for p in sources:
            p.read_bytes()

        configs = (1, 2, 0)
        runs: dict[int, list[dict]] = {w: [] for w in configs}
        order = []
        t_all = time.perf_counter()
        for rep in range(args.repeats):
            seq = configs if rep % 2 == 0 else (2, 1, 0)
            for w in seq:
                print(f"repeat {rep + 1}/{args.repeats}: workers={w} ...", file=sys.stderr, flush=True)
                r = run_once(w, sources, work, f"w{w}-r{rep}", args.n, args.interval)
                print(f"  {r['ingest_s']:.2f} s", file=sys.stderr, flush=True)
                runs[w].append(r)
                order.append(w)
        bench_s = time.perf_counter() - t_all
        prof = None if args.no_profile else profile_one(sources[0], work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    load_after = os.getloadavg()

    n = args.n
    med = statistics.median
    summary: dict[str, dict] = {}
    for w in configs:
        rs = runs[w]
        times = [r["ingest_s"] for r in rs]
        rate = n / med(times) * 60
        s: dict[str, object] = {
            "ingest_s_runs": times,
            "ingest_s_median": round(med(times), 3),
            "volumes_per_min": round(rate, 2),
            "volumes_per_min_per_worker": round(rate / max(w, 1), 2),
            "task_s_median": round(med(r["task_s_median"] for r in rs), 3),
            "task_cpu_s_per_volume": round(med((r["task_cpu_user_s"] + r["task_cpu_sys_s"]) / n for r in rs), 3),
            "task_cpu_sys_share": round(med(r["task_cpu_sys_s"] / (r["task_cpu_user_s"] + r["task_cpu_sys_s"])
                                            for r in rs), 3),
            "task_minflt_per_volume": int(med(r["task_minflt_per_volume"] for r in rs)),
            "cores_busy_ours_median": round(med(r["cores_busy_ours"] for r in rs), 2),
            "cores_busy_other_median": round(med(r["cores_busy_other"] for r in rs), 2),
        }
        if w == 0:
            s["peak_rss_mb"] = max(r["peak_rss_mb"] for r in rs)
            s["rss_before_mb"] = rs[0]["rss_before_mb"]
            s["peak_rss_increase_mb"] = round(s["peak_rss_mb"] - min(r["rss_before_mb"] for r in rs), 1)
            s["ru_maxrss_mb_lifetime"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        else:
            s["main_cpu_s_median"] = round(med(r["main_cpu_s"] for r in rs), 2)
            s["cluster_start_s_median"] = round(med(r["cluster_start_s"] for r in rs), 3)
            e2e = med(r["end_to_end_s"] for r in rs)
            s["end_to_end_s_median"] = round(e2e, 3)
            s["volumes_per_min_end_to_end"] = round(n / e2e * 60, 2)
            s["peak_rss_mb_per_worker"] = [max(v) for v in zip(*(r["peak_rss_mb_per_worker"] for r in rs), strict=True)]
            s["rss_idle_mb_per_worker"] = rs[0]["rss_idle_mb"]
            s["max_peak_rss_mb_per_worker"] = max(s["peak_rss_mb_per_worker"])
            s["worker_octpipe"] = rs[0]["worker_octpipe"]
            s["worker_MALLOC_TRIM_THRESHOLD_"] = rs[0]["worker_MALLOC_TRIM_THRESHOLD_"]
        summary[f"workers={w}"] = s

    r0, r1, r2 = (summary[f"workers={w}"] for w in (0, 1, 2))
    per_core_1 = r1["volumes_per_min_per_worker"]
    per_core_2 = r2["volumes_per_min_per_worker"]
    scaling = (r2["volumes_per_min"] / r1["volumes_per_min"]) / 2
    scaling_e2e = (r2["volumes_per_min_end_to_end"] / r1["volumes_per_min_end_to_end"]) / 2
    rss_max = max(r1["max_peak_rss_mb_per_worker"], r2["max_peak_rss_mb_per_worker"])
    result = {
        "benchmark": "ingest",
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "octpipe": provenance(args.label),
        "data": {"volumes": n, "format": "heyex-vol (phantom, linear float32) + NAME_truth.npz sidecars",
                 "shape": list(DEFAULT_SHAPE), "seed": args.seed,
                 "file_mb_each": round(sources[0].stat().st_size / MB, 1), "cache": str(args.data),
                 "generated_now_s": gen_s,
                 "note": "inputs are in the page cache (read once before timing); stores on the same local disk"},
        "method": {
            "repeats": args.repeats, "run_order": order, "statistic": "median wall time of ingest()",
            "dask": "own LocalCluster(processes=True, threads_per_worker=1, memory_limit='auto') passed as "
                    "scheduler=; timed ingest() excludes cluster start-up (reported separately, incl. warm "
                    "imports on workers) and end_to_end adds start-up and shutdown",
            "rss": f"worker RSS sampled every {args.interval} s with psutil from a background thread; "
                   "workers=0: this process's RSS sampled the same way",
            "cpu": "task_* = the processes running tasks (workers, or this process for workers=0): user+sys CPU "
                   "and minor page faults from /proc; cores_busy_other = machine busy time (/proc/stat) not "
                   "spent in our processes (other load, kernel writeback) per wall second",
        },
        "results": summary,
        "figures": {
            "volumes_per_min": {w: summary[f"workers={w}"]["volumes_per_min"] for w in configs},
            "volumes_per_min_per_worker": {w: summary[f"workers={w}"]["volumes_per_min_per_worker"]
                                           for w in configs},
            "scaling_efficiency_2_workers": round(scaling, 3),
            "scaling_efficiency_2_workers_end_to_end": round(scaling_e2e, 3),
            "dask_overhead_ratio_t1_over_t0": round(r1["ingest_s_median"] / r0["ingest_s_median"], 3),
            "dask_overhead_ratio_end_to_end_t1_over_t0": round(r1["end_to_end_s_median"] / r0["ingest_s_median"], 3),
            "task_cpu_s_per_volume": {w: summary[f"workers={w}"]["task_cpu_s_per_volume"] for w in configs},
            "peak_rss_mb_per_worker_max": rss_max,
            "peak_rss_mb_in_process": r0["peak_rss_mb"],
        },
        "targets": {
            "volumes_per_min_per_core": {
                "target": f">= {TARGET_VOLUMES_PER_MIN_PER_CORE:g}", "workers_1": per_core_1,
                "workers_2": per_core_2,
                "met": bool(min(per_core_1, per_core_2) >= TARGET_VOLUMES_PER_MIN_PER_CORE)},
            "scaling_efficiency_2_workers": {
                "target": f">= {TARGET_SCALING_EFFICIENCY_2:g}", "value": round(scaling, 3),
                "met": bool(scaling >= TARGET_SCALING_EFFICIENCY_2)},
            "rss_per_worker_mb": {
                "target": f"< {TARGET_RSS_PER_WORKER_MB:g}", "value": rss_max,
                "met": bool(rss_max < TARGET_RSS_PER_WORKER_MB)},
        },
        "profile_workers0_one_volume": prof,
        "machine": {"cpu_count": os.cpu_count(), "cpu_affinity": len(os.sched_getaffinity(0)),
                    "memory_gb": round(psutil.virtual_memory().total / 1024**3, 1),
                    "processor": platform.processor() or platform.machine(), "platform": platform.platform(),
                    "loadavg_before": [round(x, 2) for x in load_before],
                    "loadavg_after": [round(x, 2) for x in load_after], "benchmark_s": round(bench_s, 1),
                    **versions()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
