"""The demo run behind ``octpipe demo``: the run file ``pipelines/demo.yaml`` on a phantom cohort.

The demo runs the steps of its run file through the same code as ``octpipe run`` (each step
checked before the first runs, then each an octpipe command), with the file's ``demo-run/``
folder as the demo's output folder and the model path taken from the repository. Between
the steps it adds its own checks and pictures: after the phantoms are written it reads every
file back through octpipe's readers and checks it against the truth; after the patches, a
figure per phantom. The export step maps a healthy phantom and a phantom with fluid with the
bundled f-AnoGAN model (``models/fanogan-phantom``), ranked in the screening index.
"""

from __future__ import annotations

import csv
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from octpipe.errors import OctpipeError
from octpipe.volume import OctVolume

__all__ = ["run_demo", "demo_steps", "DEMO_LESIONS", "BUNDLED_MODEL", "DEMO_RUN_FILE"]

_REPO = Path(__file__).resolve().parents[1]
#: The bundled trained model (a run folder with model.pt, calibration and model card).
BUNDLED_MODEL = _REPO / "models" / "fanogan-phantom"
#: The demo's run file; its paths under ``demo-run/`` are the demo's output folder.
DEMO_RUN_FILE = _REPO / "pipelines" / "demo.yaml"
_RUN_FOLDER = "demo-run/"

#: Lesions of the demo's diseased phantoms: one of each kind, default sizes.
DEMO_LESIONS = "irf,srf,ped,drusen,hrf"


#: The phantom formats the demo writes; each is read back with format detection.
_FORMATS = ("vol", "dicom", "nifti", "png")


def _check_readback(fmt: str, vol: OctVolume, truth: dict, ilm: np.ndarray, bm: np.ndarray) -> list[str]:
    """Differences between a volume read back from disk and the phantom truth."""
    problems = []
    if list(vol.shape) != truth["shape"]:
        problems.append(f"shape {vol.shape} != {tuple(truth['shape'])}")
    if fmt != "png" and not np.allclose(vol.spacing_mm, truth["spacing_mm"], rtol=1e-5):
        problems.append(f"spacing {vol.spacing_mm} != {truth['spacing_mm']}")
    if fmt in ("vol", "dicom") and vol.laterality != truth["laterality"]:
        problems.append(f"laterality {vol.laterality} != {truth['laterality']}")
    if fmt == "vol":
        for name, ref in (("ILM", ilm), ("BM", bm)):
            got = vol.layers.get(name)
            if got is None or not np.allclose(got, ref, atol=1e-4):
                problems.append(f"{name} differs from the truth")
    return problems


def _figure(phantom_npz: Path, display: np.ndarray, truth: dict, out_png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with np.load(phantom_npz) as t:
        mask, ilm, bm = t["lesion_mask"], t["ilm"], t["bm"]
    per_bscan = mask.reshape(mask.shape[0], -1).astype(bool).sum(1)
    i = int(np.argmax(per_bscan)) if per_bscan.any() else mask.shape[0] // 2
    dz, dy, dx = truth["spacing_mm"]
    ny, nx = display.shape[1:]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), gridspec_kw={"width_ratios": [2.2, 1]})
    extent = (0, nx * dx, ny * dy, 0)
    axes[0].imshow(display[i], cmap="gray", vmin=0, vmax=1, extent=extent, aspect="auto")
    xs = (np.arange(nx) + 0.5) * dx
    axes[0].plot(xs, (ilm[i] + 0.5) * dy, color="lime", lw=0.8, label="ILM (truth)")
    axes[0].plot(xs, (bm[i] + 0.5) * dy, color="cyan", lw=0.8, label="BM (truth)")
    if mask[i].any():
        overlay = np.ma.masked_equal(mask[i], 0)
        axes[0].imshow(overlay, cmap="autumn", alpha=0.45, extent=extent, aspect="auto", vmin=1, vmax=5)
    axes[0].set(title=f"{truth['name']} B-scan {i} ({truth['laterality']}); lesions: "
                      f"{', '.join(truth['lesion_types']) or 'none'}", xlabel="mm", ylabel="depth, mm")
    axes[0].legend(loc="lower right", fontsize=8)
    enface = mask.any(axis=1)
    axes[1].imshow(display.mean(axis=1)[::-1], cmap="gray", extent=(0, nx * dx, 0, mask.shape[0] * dz),
                   aspect="equal")
    if enface.any():
        axes[1].imshow(np.ma.masked_equal(enface[::-1].astype(np.uint8), 0), cmap="autumn", alpha=0.5,
                       extent=(0, nx * dx, 0, mask.shape[0] * dz), aspect="equal")
    axes[1].axhline((i + 0.5) * dz, color="yellow", lw=0.8)
    axes[1].set(title="en-face mean, lesions (superior up)", xlabel="mm", ylabel="mm")
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)


def _rebase(value: Any, out: Path) -> Any:
    """A run-file value with ``demo-run/`` paths under ``out`` and ``models/`` paths in the repository."""
    if isinstance(value, list):
        return [_rebase(v, out) for v in value]
    if isinstance(value, str) and value.startswith(_RUN_FOLDER):
        return str(out / value[len(_RUN_FOLDER):])
    if isinstance(value, str) and value.startswith("models/"):
        return str(_REPO / value)
    return value


def demo_steps(out: Path, *, n: int = 4, seed: int = 0, shape: tuple[int, int, int] | None = None,
               spacing_mm: tuple[float, float, float] | None = None, workers: int | None = None,
               run_file: Path = DEMO_RUN_FILE) -> list[tuple[str, dict[str, Any]]]:
    """The steps of the demo's run file for output folder ``out``, with the demo's settings applied.

    Parameters
    ----------
    out : Path
        Replaces the run file's ``demo-run/`` folder.
    n, seed, shape, spacing_mm
        The phantom step's ``n``, ``seed``, ``shape`` and ``spacing`` (None keeps the file's).
    workers : int, optional
        Dask workers of the ingest, patches and export steps (None keeps the file's; 0 runs
        in this process).
    run_file : Path
        The run file (``pipelines/demo.yaml``).
    """
    from octpipe.cli.run import load_run_file

    _, steps = load_run_file(run_file)
    out_steps = []
    for command, options in steps:
        options = {k: _rebase(v, out) for k, v in options.items()}
        if command == "phantom":
            options.update(n=n, seed=seed, lesions=DEMO_LESIONS)
            if shape is not None:
                options["shape"] = ",".join(str(int(v)) for v in shape)
            if spacing_mm is not None:
                options["spacing"] = ",".join(f"{float(v):g}" for v in spacing_mm)
        if command in ("ingest", "patches", "export") and workers is not None:
            options["workers"] = workers
        out_steps.append((command, options))
    return out_steps


def _manifest_counts(manifest: Path) -> dict[str, int]:
    from octpipe.manifest import load_manifest

    counts = {"ok": 0, "skipped": 0, "failed": 0}
    for row in load_manifest(manifest):
        counts[str(row.get("status"))] = counts.get(str(row.get("status")), 0) + 1
    return counts


def _split_stats(store: Path, split: str, seconds: float) -> dict:
    from octpipe.store import open_patch_split

    group = open_patch_split(store, split)
    labels, counts = np.unique(np.asarray(group["label"][...]), return_counts=True)
    label_counts = {-1: 0, 0: 0, 1: 0, **{int(k): int(c) for k, c in zip(labels, counts, strict=True)}}
    return {"n": int(group["x"].shape[0]), "volumes": len(group.attrs.get("volumes", [])), "labels": label_counts,
            "seconds": round(seconds, 3)}


def run_demo(out: Path, *, n: int = 4, seed: int = 0, progress: bool = False,
             echo: Callable[[str], object] = print, shape: tuple[int, int, int] | None = None,
             spacing_mm: tuple[float, float, float] | None = None, workers: int | None = None) -> dict:
    """Run the demo into ``out`` and return a summary dict (also printed via ``echo``).

    Parameters
    ----------
    out : Path
        Output folder (must not hold an earlier demo; the CLI clears it with --overwrite).
    n : int
        Phantoms in the cohort; half are healthy.
    seed : int
        Cohort seed.
    progress : bool
        Show progress bars.
    echo : callable
        Where the progress lines go.
    shape, spacing_mm : tuple, optional
        Phantom geometry; the Spectralis default (49 × 496 × 512) when None.
    workers : int, optional
        Dask workers of the ingest, patches and export steps (default the run file's; 0 runs
        in-process).

    Returns
    -------
    dict
        ``stages`` with their outputs, ``failures`` (list of strings).
    """
    import json
    import time

    from octpipe.cli.run import check_steps, run_step
    from octpipe.preprocess.intensity import linear_to_display

    out = Path(out)
    summary: dict = {"stages": {}, "failures": [], "run_file": str(DEMO_RUN_FILE)}
    steps = demo_steps(out, n=n, seed=seed, shape=shape, spacing_mm=spacing_mm, workers=workers)
    lines = check_steps(steps, DEMO_RUN_FILE.name)  # every step checked before the first runs
    todo = list(zip([c for c, _ in steps], [o for _, o in steps], lines, strict=True))

    def step(command: str) -> tuple[dict[str, Any], float] | None:
        """Run the next step of the run file (which must be ``command``); None when it failed."""
        if not todo or todo[0][0] != command:
            raise OctpipeError(f"the demo expects a {command} step next in its run file", DEMO_RUN_FILE)
        _, options, argv = todo.pop(0)
        t0 = time.perf_counter()
        code = run_step(argv, verbosity=-1, progress=progress)
        if code != 0:
            summary["failures"].append(f"step {len(lines) - len(todo)} ({command}) failed with exit code {code}: "
                                       f"octpipe {' '.join(argv)}")
            return None
        return options, time.perf_counter() - t0

    # 1. phantom cohort in four vendor formats
    done = step("phantom")
    if done is None:
        return summary
    phantom_dir = Path(done[0]["out"])
    manifest = phantom_dir / "manifest.csv"
    echo(f"[1/6] phantoms: {n} volumes in vol/dicom/nifti/png -> {phantom_dir} (manifest {manifest.name})")
    summary["stages"]["phantoms"] = {"folder": str(phantom_dir), "manifest": str(manifest), "n": n}

    # 2. read every file back through octpipe's readers and compare with the truth
    from octpipe.io import read_volume

    rows = []
    with open(manifest) as fh:
        entries = list(csv.DictReader(fh))
    for entry in entries:
        truth = json.loads((phantom_dir / entry["truth_json"]).read_text())
        with np.load(phantom_dir / entry["truth_npz"]) as t:
            ilm, bm = t["ilm"], t["bm"]
        for fmt in _FORMATS:
            path = phantom_dir / entry[fmt]
            try:
                vol = read_volume(path)
                problems = _check_readback(fmt, vol, truth, ilm, bm)
            except OctpipeError as exc:
                vol, problems = None, [str(exc)]
            rows.append({
                "name": entry["name"], "format": fmt, "file": entry[fmt],
                "shape": "x".join(map(str, vol.shape)) if vol else "",
                "spacing_mm": ";".join(f"{s:g}" for s in vol.spacing_mm) if vol else "",
                "spacing_source": vol.spacing_source if vol else "",
                "laterality": (vol.laterality or "") if vol else "",
                "ok": int(not problems), "problems": "; ".join(problems),
            })
            summary["failures"] += [f"{entry['name']} {fmt}: {p}" for p in problems]
    readback = out / "readback.csv"
    with open(readback, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    n_ok = sum(r["ok"] for r in rows)
    echo(f"[2/6] read back: {n_ok}/{len(rows)} files match the truth (shape, spacing, laterality, ILM/BM) "
         f"-> {readback}")
    summary["stages"]["readback"] = {"table": str(readback), "ok": n_ok, "total": len(rows)}

    # 3. ingest the whole phantom folder into a Zarr store on a local Dask cluster
    done = step("ingest")
    if done is None:
        return summary
    store = Path(done[0]["out"])
    store_manifest = store.with_name(store.name.removesuffix(".zarr") + "-manifest.csv")  # with the real paths
    c = _manifest_counts(store_manifest)
    seconds = round(done[1], 1)
    echo(f"[3/6] ingest: {c['ok']} volumes written, {c['skipped']} non-OCT files skipped, {c['failed']} failed "
         f"in {seconds} s -> {store} (manifest {store_manifest.name})")
    summary["stages"]["ingest"] = {"store": str(store), "manifest": str(store_manifest), **c, "seconds": seconds}
    if c["failed"] or c["ok"] != len(_FORMATS) * n:
        summary["failures"].append(f"ingest: expected {len(_FORMATS) * n} volumes, got {c}")

    # 4. patch datasets: random training patches from the healthy volumes, a test grid over all
    patch_stats = {}
    for _ in range(2):
        done = step("patches")
        if done is None:
            return summary
        patch_stats[done[0]["split"]] = _split_stats(store, done[0]["split"], done[1])
    tr, te = patch_stats["train"], patch_stats["test"]
    echo(f"[4/6] patches: train {tr['n']} from {tr['volumes']} healthy volumes; test {te['n']} "
         f"(anomalous {te['labels'][1]}, normal {te['labels'][0]}) -> {store / 'patches'}")
    summary["stages"]["patches"] = patch_stats
    if not te["labels"][1] or not te["labels"][0]:
        summary["failures"].append(f"patches: test split should hold normal and anomalous patches, got {te}")

    # 5. figures: the most diseased B-scan of each phantom with its truth, and the en-face lesion map
    figures = []
    for entry in entries:
        truth = json.loads((phantom_dir / entry["truth_json"]).read_text())
        vol = read_volume(phantom_dir / entry["vol"])
        png = out / "figures" / f"{entry['name']}.png"
        _figure(phantom_dir / entry["truth_npz"], linear_to_display(vol.data), truth, png)
        figures.append(str(png))
    echo(f"[5/6] figures: {len(figures)} B-scan + en-face truth figures -> {out / 'figures'}")
    summary["stages"]["figures"] = figures

    # 6. anomaly maps, reports and the screening index with the bundled model; then the evaluation
    summary["stages"]["export"] = _export_stage(phantom_dir, store, store_manifest, entries, echo, summary, todo,
                                                step)
    while todo:  # the run file's remaining steps (the evaluation)
        command = todo[0][0]
        done = step(command)
        if done is None:
            return summary
        summary["stages"][command] = {"folder": str(done[0].get("out", "")), "seconds": round(done[1], 1)}
    return summary


def _export_stage(phantom_dir: Path, store: Path, manifest: Path, entries: list[dict],
                  echo: Callable[[str], object], summary: dict, todo: list, step: Callable) -> dict:
    """Run the run file's export step for a healthy phantom (.vol) and one with fluid (DICOM).

    The DICOM source makes the Parametric Map path run.
    """
    import json

    if not todo or todo[0][0] != "export":
        raise OctpipeError("the demo expects an export step next in its run file", DEMO_RUN_FILE)
    if not (BUNDLED_MODEL / "model.pt").is_file():
        summary["failures"].append(f"export: no bundled model at {BUNDLED_MODEL}")
        echo(f"[6/6] export: skipped, no bundled model at {BUNDLED_MODEL}")
        todo.clear()
        return {}
    from octpipe.cli.run import step_argv
    from octpipe.manifest import load_manifest

    ingested = {row["path"]: row["volume_id"] for row in load_manifest(manifest) if row.get("volume_id")}
    healthy = [e for e in entries if not json.loads((phantom_dir / e["truth_json"]).read_text())["diseased"]]
    diseased = [e for e in entries if e not in healthy]
    chosen = {}
    if healthy:
        chosen[ingested[f"{phantom_dir.name}/{healthy[0]['vol']}"]] = ("healthy", healthy[0]["name"], "vol")
    if diseased:
        chosen[ingested[f"{phantom_dir.name}/{diseased[0]['dicom']}"]] = ("fluid", diseased[0]["name"], "dicom")
    command, options, _ = todo[0]
    options = {**options, "volume": list(chosen)}  # the two volumes, not the whole store
    todo[0] = (command, options, step_argv(command, options, f"{DEMO_RUN_FILE.name} export step"))
    done = step("export")
    export_dir = Path(options["out"])
    ranked = []
    failed = {}
    if (export_dir / "index.csv").is_file():
        with open(export_dir / "index.csv") as fh:
            for row in csv.DictReader(fh):
                if row["volume_id"] not in chosen:
                    continue
                if row.get("status", "ok") != "ok":
                    failed[row["volume_id"]] = row.get("reason", "")
                    continue
                kind, name, fmt = chosen[row["volume_id"]]
                ranked.append({"volume_id": row["volume_id"], "phantom": name, "format": fmt, "truth": kind,
                               "volume_score": float(row["volume_score"]), "percentile": row["volume_percentile"],
                               "report": str(export_dir / row["report"])})
    summary["failures"] += [f"export {vid}: {reason}" for vid, reason in failed.items()]
    seconds = done[1] if done else 0.0
    order = ", ".join(f"{r['truth']} {r['phantom']} ({r['volume_score']:.3g})" for r in ranked)
    echo(f"[6/6] export: anomaly maps and reports of {len(ranked)} volumes in {seconds:.0f} s with "
         f"{BUNDLED_MODEL.name}; ranked {order} -> {export_dir / 'index.html'}")
    return {"folder": str(export_dir), "index": str(export_dir / "index.html"), "ranked": ranked,
            "seconds": round(seconds, 1), "model": str(BUNDLED_MODEL)}
