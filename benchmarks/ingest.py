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
read back is 49x496x512, finite, within [-1, 1]); the script fails loudly otherwise.

A cProfile of ``ingest_one`` on one volume in-process, and a stage-by-stage timing of
the same steps (hash, read, display transform, normalise, zarr write), show where a
volume's time goes.

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


def cpu_s(pid: int) -> float:
    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


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
    """Fail loudly unless the manifest has ``n`` ok rows and a volume reads back complete."""
    from octpipe.store import read_volume_group

    with open(store / "manifest.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    ok = [r for r in rows if r["status"] == "ok"]
    bad = [r for r in rows if r["status"] != "ok"]
    if len(ok) != n or bad:
        raise SystemExit(f"FAIL: {store}: manifest has {len(ok)} ok rows (want {n}); others: "
                         f"{[(r['path'], r['status'], r['error']) for r in bad]}")
    arrays, attrs = read_volume_group(store, ok[len(ok) // 2]["volume_id"])
    image = arrays["image"]
    problems = []
    if image.shape != shape:
        problems.append(f"shape {image.shape} != {shape}")
    if not np.isfinite(image).all():
        problems.append("non-finite values")
    elif image.min() < -1 or image.max() > 1:
        problems.append(f"values in [{image.min()}, {image.max()}], not within [-1, 1]")
    if attrs.get("status") != "complete":
        problems.append(f"status {attrs.get('status')!r}")
    if problems:
        raise SystemExit(f"FAIL: {store}: volume {ok[0]['volume_id']}: {'; '.join(problems)}")


def task_seconds(store: Path) -> list[float]:
    with open(store / "manifest.csv", newline="") as fh:
        return [float(r["seconds"]) for r in csv.DictReader(fh) if r["status"] == "ok"]


def warm_worker() -> int:
    """Import what a task imports, so the timed run does not pay for it."""
    import octpipe.io.heyex_vol  # noqa: F401
    import octpipe.pipeline  # noqa: F401
    import octpipe.preprocess.intensity  # noqa: F401
    import octpipe.store  # noqa: F401

    return os.getpid()


def run_once(workers: int, sources: list[Path], work: Path, tag: str, n: int, interval: float) -> dict:
    """One timed ingest into a fresh store; returns timings and RSS peaks."""
    from octpipe.pipeline import ingest

    store = work / f"store-{tag}.zarr"
    manifest = work / f"manifest-{tag}.csv"
    if store.exists():
        shutil.rmtree(store)
    out: dict[str, object] = {"workers": workers}
    if workers == 0:
        me = os.getpid()
        out["rss_before_mb"] = rss_mb(me)
        with RssSampler([me], interval) as sampler:
            c0 = cpu_s(me)
            t0 = time.perf_counter()
            result = ingest(sources, store, workers=0, manifest=manifest)
            out["ingest_s"] = time.perf_counter() - t0
            out["cpu_s_main"] = cpu_s(me) - c0
        out["cores_busy"] = out["cpu_s_main"] / out["ingest_s"]
        out["peak_rss_mb"] = sampler.peak_mb()[me]
        out["rss_samples"] = sampler.samples
    else:
        from dask.distributed import Client, LocalCluster

        t0 = time.perf_counter()
        cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None,
                               memory_limit="auto", silence_logs=40)
        client = Client(cluster)
        client.wait_for_workers(workers)
        pids = sorted(client.run(warm_worker).values())
        out["cluster_start_s"] = time.perf_counter() - t0
        out["rss_idle_mb"] = [rss_mb(p) for p in pids]
        try:
            me = os.getpid()
            with RssSampler(pids, interval) as sampler:
                c0 = [cpu_s(p) for p in pids]
                cm = cpu_s(me)
                t1 = time.perf_counter()
                result = ingest(sources, store, scheduler=cluster.scheduler_address, manifest=manifest)
                out["ingest_s"] = time.perf_counter() - t1
                out["cpu_s_main"] = cpu_s(me) - cm  # scheduler + client + sampler live in this process
                out["cpu_s_per_worker"] = [cpu_s(p) - c for p, c in zip(pids, c0, strict=True)]
            out["cores_busy"] = (out["cpu_s_main"] + sum(out["cpu_s_per_worker"])) / out["ingest_s"]
            peaks = sampler.peak_mb()
            out["peak_rss_mb_per_worker"] = [peaks[p] for p in pids]
            out["rss_samples"] = sampler.samples
        finally:
            t2 = time.perf_counter()
            client.close()
            cluster.close()
            out["cluster_close_s"] = time.perf_counter() - t2
        out["end_to_end_s"] = out["cluster_start_s"] + out["ingest_s"] + out["cluster_close_s"]
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


def profile_one(source: Path, work: Path) -> dict:
    """Where one volume's time goes, in-process: stage timings and a cProfile of ingest_one."""
    from octpipe.io import read_volumes
    from octpipe.io._common import file_sha256
    from octpipe.pipeline import discover_inputs, ingest_one
    from octpipe.preprocess.intensity import display_full_scale, normalize_volume, to_display
    from octpipe.store import open_store, store_salt, store_volume_id, write_volume

    (item,), _ = discover_inputs([source])
    store = work / "store-profile.zarr"

    def fresh() -> str:
        if store.exists():
            shutil.rmtree(store)
        open_store(store)
        return store_salt(store)

    # Stage timings (best of 3), the same steps ingest_one takes.
    stages: dict[str, list[float]] = {k: [] for k in
                                      ("sha256_pipeline", "read_volumes", "to_display", "normalize", "write_zarr")}
    for _ in range(3):
        salt = fresh()
        t = time.perf_counter()
        sha = file_sha256(item.path)
        stages["sha256_pipeline"].append(time.perf_counter() - t)
        t = time.perf_counter()
        (vol,) = read_volumes(item.path, format=item.format)
        stages["read_volumes"].append(time.perf_counter() - t)
        t = time.perf_counter()
        display = to_display(vol.data, domain=vol.intensity, full_scale=display_full_scale(vol.meta, vol.data),
                             method="log")
        stages["to_display"].append(time.perf_counter() - t)
        t = time.perf_counter()
        image, _ = normalize_volume(display, invalid=vol.invalid)
        stages["normalize"].append(time.perf_counter() - t)
        arrays = {"image": image}
        if vol.layers:
            arrays["layers"] = np.stack([vol.layers[k] for k in vol.layers]).astype(np.float32)
        if vol.invalid is not None and vol.invalid.any():
            arrays["valid"] = (~vol.invalid).astype(np.uint8)
        t = time.perf_counter()
        write_volume(store, store_volume_id(salt, sha, 0), arrays, {"sha256": sha})
        stages["write_zarr"].append(time.perf_counter() - t)
    best = {k: round(min(v), 3) for k, v in stages.items()}
    total = sum(best.values())
    stored = sum(f.stat().st_size for f in (store / "volumes").rglob("*") if f.is_file())

    # cProfile of the real ingest_one (one warm run first).
    salt = fresh()
    ingest_one(item, str(store), salt, {})
    salt = fresh()
    prof = cProfile.Profile()
    t = time.perf_counter()
    prof.enable()
    rows = ingest_one(item, str(store), salt, {})
    prof.disable()
    wall = time.perf_counter() - t
    assert rows[0]["status"] == "ok", rows
    stats = pstats.Stats(prof)
    top = []
    for (file, line, func), (_cc, nc, tt, ct, _callers) in sorted(stats.stats.items(), key=lambda kv: -kv[1][2])[:15]:
        top.append({"function": f"{Path(file).name}:{line}({func})", "calls": nc, "tottime_s": round(tt, 3),
                    "cumtime_s": round(ct, 3)})
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("cumulative").print_stats(25)
    shutil.rmtree(store)
    raw = item.path and Path(item.path).stat().st_size
    return {
        "volume": Path(item.path).name,
        "file_mb": round(raw / MB, 1),
        "stored_mb": round(stored / MB, 1),
        "stage_seconds_best_of_3": best,
        "stage_share": {k: round(v / total, 3) for k, v in best.items()},
        "stage_total_s": round(total, 3),
        "ingest_one_wall_s_under_cprofile": round(wall, 3),
        "cprofile_top_by_tottime": top,
        "cprofile_cumulative_text": text.getvalue().splitlines()[:60],
    }


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
    summary: dict[str, dict] = {}
    for w in configs:
        times = [r["ingest_s"] for r in runs[w]]
        med = statistics.median(times)
        rate = n / med * 60
        s: dict[str, object] = {
            "ingest_s_runs": times,
            "ingest_s_median": round(med, 3),
            "volumes_per_min": round(rate, 2),
            "volumes_per_min_per_worker": round(rate / max(w, 1), 2),
            "task_s_median": round(statistics.median(r["task_s_median"] for r in runs[w]), 3),
            "cpu_s_main_median": round(statistics.median(r["cpu_s_main"] for r in runs[w]), 2),
            "cores_busy_median": round(statistics.median(r["cores_busy"] for r in runs[w]), 2),
        }
        if w:
            s["cpu_s_workers_median"] = round(statistics.median(sum(r["cpu_s_per_worker"]) for r in runs[w]), 2)
            s["worker_cpu_s_per_volume"] = round(s["cpu_s_workers_median"] / n, 3)
        else:
            s["cpu_s_per_volume"] = round(s["cpu_s_main_median"] / n, 3)
        if w == 0:
            s["peak_rss_mb"] = max(r["peak_rss_mb"] for r in runs[w])
            s["rss_before_mb"] = runs[w][0]["rss_before_mb"]
            s["peak_rss_increase_mb"] = round(s["peak_rss_mb"] - min(r["rss_before_mb"] for r in runs[w]), 1)
            s["ru_maxrss_mb_lifetime"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        else:
            s["cluster_start_s_median"] = round(statistics.median(r["cluster_start_s"] for r in runs[w]), 3)
            e2e = statistics.median(r["end_to_end_s"] for r in runs[w])
            s["end_to_end_s_median"] = round(e2e, 3)
            s["volumes_per_min_end_to_end"] = round(n / e2e * 60, 2)
            s["peak_rss_mb_per_worker"] = [max(vals) for vals in zip(*(r["peak_rss_mb_per_worker"] for r in runs[w]))]
            s["rss_idle_mb_per_worker"] = runs[w][0]["rss_idle_mb"]
            s["max_peak_rss_mb_per_worker"] = max(s["peak_rss_mb_per_worker"])
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
        "data": {"volumes": n, "format": "heyex-vol (phantom, linear float32)", "shape": list(DEFAULT_SHAPE),
                 "seed": args.seed, "file_mb_each": round(sources[0].stat().st_size / MB, 1),
                 "cache": str(args.data), "generated_now_s": gen_s,
                 "note": "inputs are in the page cache (read once before timing); stores on the same local disk"},
        "method": {
            "repeats": args.repeats, "run_order": order, "statistic": "median wall time of ingest()",
            "dask": "own LocalCluster(processes=True, threads_per_worker=1, memory_limit='auto') passed as "
                    "scheduler=; timed ingest() excludes cluster start-up (reported separately, incl. warm "
                    "imports on workers) and end_to_end adds start-up and shutdown",
            "rss": f"worker RSS sampled every {args.interval} s with psutil from a background thread; "
                   "workers=0: this process's RSS sampled the same way",
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
