"""The demo run behind ``octpipe demo``: every stage that exists, on a phantom cohort.

It always does real work: it makes the phantoms, writes them in vendor formats, reads
them back through octpipe's readers and checks the result against the truth, and draws
the figures, ingests the folder with Dask, cuts patch datasets, and ends with the anomaly
maps and clinical report of the bundled f-AnoGAN model (``models/fanogan-phantom``) for a
healthy phantom and a phantom with fluid, with the screening index that ranks them.
"""

from __future__ import annotations

import csv
from collections.abc import Callable
from pathlib import Path

import numpy as np

from octpipe.errors import OctpipeError
from octpipe.volume import OctVolume

__all__ = ["run_demo", "DEMO_LESIONS", "BUNDLED_MODEL"]

#: The bundled trained model (a run folder with model.pt, calibration and model card).
BUNDLED_MODEL = Path(__file__).resolve().parents[1] / "models" / "fanogan-phantom"

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
        Dask workers for the ingest stage (default all cores; 0 runs in-process).

    Returns
    -------
    dict
        ``stages`` with their outputs, ``failures`` (list of strings).
    """
    import json

    from octpipe.preprocess.intensity import linear_to_display
    from octpipe.testing.phantom_files import write_cohort
    from octpipe.testing.phantoms import make_cohort, parse_lesion_specs

    out = Path(out)
    summary: dict = {"stages": {}, "failures": []}

    # 1. phantom cohort in four vendor formats
    phantom_dir = out / "phantoms"
    geometry = {k: v for k, v in (("shape", shape), ("spacing_mm", spacing_mm)) if v is not None}
    cohort = make_cohort(n, seed=seed, lesions=parse_lesion_specs(DEMO_LESIONS), healthy_fraction=0.5, **geometry)
    manifest = write_cohort(cohort, phantom_dir, progress=progress)
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
    from octpipe.pipeline import ingest

    store = out / "store.zarr"
    result = ingest([phantom_dir], store, workers=workers, progress=progress)
    c = result.counts
    echo(f"[3/6] ingest: {c['ok']} volumes written, {c['skipped']} non-OCT files skipped, {c['failed']} failed "
         f"in {result.seconds} s -> {store} (manifest {result.manifest.name})")
    summary["stages"]["ingest"] = {"store": str(store), "manifest": str(result.manifest), **c,
                                   "seconds": result.seconds}
    if c["failed"] or c["ok"] != len(_FORMATS) * n:
        summary["failures"].append(f"ingest: expected {len(_FORMATS) * n} volumes, got {c}")

    # 4. patch datasets: random training patches from the healthy volumes, a test grid over all
    from octpipe.patches import write_patch_split

    patch_stats = {}
    for split in ("train", "test"):
        res = write_patch_split(store, split, workers=workers, progress=progress, k=16 if split == "train" else 64)
        patch_stats[split] = {"n": res.n_patches, "volumes": res.n_volumes, "labels": res.label_counts,
                              "seconds": res.seconds}
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

    # 6. anomaly maps, reports and the screening index with the bundled model
    summary["stages"]["export"] = _export_stage(out, phantom_dir, store, result.manifest, entries, echo, summary)
    return summary


def _export_stage(out: Path, phantom_dir: Path, store: Path, manifest: Path, entries: list[dict],
                  echo: Callable[[str], object], summary: dict) -> dict:
    """Export one healthy phantom (.vol) and one with fluid (DICOM, so the Parametric Map path runs)."""
    import json

    from octpipe.export.anomaly import MapSettings
    from octpipe.export.run import export_store

    if not (BUNDLED_MODEL / "model.pt").is_file():
        summary["failures"].append(f"export: no bundled model at {BUNDLED_MODEL}")
        echo(f"[6/6] export: skipped, no bundled model at {BUNDLED_MODEL}")
        return {}
    from octpipe.manifest import load_manifest

    ingested = {row["path"]: row["volume_id"] for row in load_manifest(manifest) if row.get("volume_id")}
    healthy = [e for e in entries if not json.loads((phantom_dir / e["truth_json"]).read_text())["diseased"]]
    diseased = [e for e in entries if e not in healthy]
    chosen = {}
    if healthy:
        chosen[ingested[f"{phantom_dir.name}/{healthy[0]['vol']}"]] = ("healthy", healthy[0]["name"], "vol")
    if diseased:
        chosen[ingested[f"{phantom_dir.name}/{diseased[0]['dicom']}"]] = ("fluid", diseased[0]["name"], "dicom")
    export_dir = out / "export"
    res = export_store(store, BUNDLED_MODEL, export_dir, volume_ids=list(chosen), workers=0,
                       settings=MapSettings(), source_root=phantom_dir.parent)  # store paths start at it
    ranked = []
    with open(export_dir / "index.csv") as fh:
        for row in csv.DictReader(fh):
            if row.get("status", "ok") != "ok" or row["volume_id"] not in chosen:
                continue  # a failed volume is listed in res.failed
            kind, name, fmt = chosen[row["volume_id"]]
            ranked.append({"volume_id": row["volume_id"], "phantom": name, "format": fmt, "truth": kind,
                           "volume_score": float(row["volume_score"]), "percentile": row["volume_percentile"],
                           "report": str(export_dir / row["report"])})
    summary["failures"] += [f"export {vid}: {reason}" for vid, reason in res.failed.items()]
    order = ", ".join(f"{r['truth']} {r['phantom']} ({r['volume_score']:.3g})" for r in ranked)
    echo(f"[6/6] export: anomaly maps and reports of {len(res.done)} volumes in {res.seconds:.0f} s with "
         f"{BUNDLED_MODEL.name}; ranked {order} -> {export_dir / 'index.html'}")
    return {"folder": str(export_dir), "index": str(export_dir / "index.html"), "ranked": ranked,
            "seconds": round(res.seconds, 1), "model": str(BUNDLED_MODEL)}
