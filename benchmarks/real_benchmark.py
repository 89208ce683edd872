"""f-AnoGAN on real OCT: trained on OCTDL normal B-scans, measured on real diseases and lesion outlines.

One command builds everything with the pipeline a user runs (``octpipe ingest`` → ``patches`` →
``train`` → scoring the stores as ``octpipe export`` does) and compares f-AnoGAN with the
baselines side by side, on the same patches and the same image score:

- **data** (``../shared/data/cohorts``, read its SOURCES.md): OCTDL (Optovue) ``train/NO`` is
  split **by patient** into training patients and held-out calibration patients; a training
  patient whose id, or any of whose images (byte for byte), also occurs in OCTDL ``val`` is left
  out (OCTDL has the same eye under two ids: ``train/NO/no_5959811_*`` = ``val/NO/no_9663705_*``).
  No image of a ``val`` patient is used in training or calibration. Everything is ingested as
  folders of independent B-scans (one volume per B-scan), spacing estimated from the retina.
- **f-AnoGAN**: WGAN-GP, then the izi_f encoder (``pipelines/fanogan-octdl.yaml``), with
  ``octpipe train ... --resume`` (a run interrupted anywhere continues where it stopped); the
  calibration patches are the held-out patients' grid patches (``patches/calib``).
- **baselines** on the same training patches: the convolutional autoencoder (AE), the
  adversarial autoencoder (AdvAE), and three trivial ones: mean intensity, dark fraction
  inside the retina, and retinal thickness irregularity (the standard deviation of the
  ILM-BM thickness across the B-scan, relative to its median: no learning at all).
- **image score**, defined once for every method: the 99th percentile of the patch scores on
  the B-scan's grid of 64×64 patches (stride 32) over the flattened retina, the same rule as the
  volume score of ``octpipe export`` (``score.volume_score``). For the trivial per-image
  baselines (thickness irregularity) the image score is the statistic itself.
- **tables**: image level on OCTDL ``val`` (normal vs each disease and vs all diseases: ROC AUC
  and Youden statistics); cross-device on Kermany ``val`` (Spectralis; NORMAL vs CNV/DME/DRUSEN,
  the OCTDL model unchanged); pixel level on the Kermany B-scans with lesion outlines (the
  rasterised polygons inside the retina, per lesion class, as the paper's Table B1).

Writes ``benchmarks/results/real_benchmark.json``, the section "Real data" of
``benchmarks/RESULTS.md`` and ``docs/real-export.png`` (``octpipe export`` of real diseased
B-scans beside the B-scans, chosen by a fixed rule). Stores, checkpoints and exports live in
``--work`` (outside the repository); every stage skips what is already done, and training resumes
from its checkpoints, so an interrupted run is continued by running the same command again.
``--stage bundle`` copies the trained run into ``models/fanogan-octdl``.

Usage: .venv/bin/python benchmarks/real_benchmark.py --work DIR
       [--stage all|data|train|baselines|evaluate|figure|bundle] [--threads 2] [--model DIR]
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import hashlib
import json
import os
import platform
import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from octpipe.manifest import load_manifest  # noqa: E402
from octpipe.testing.realdata import shared_data  # noqa: E402

OCTDL = "cohorts/code-world-ad_OpticIntel-OCT-Disease-Detection-System/dataset"
KERMANY = "cohorts/Goodsea_heysaw/deploy/val"
OUTLINES = "cohorts/akulistus_oct-segmentation-model/annotation/YOLO-style-annotations-raw/train"
CALIB_PATIENTS = 10
SPLIT_SEED = 0
CONFIG = ROOT / "pipelines" / "fanogan-octdl.yaml"
K_TRAIN = 96  # random 64x64 patches per training B-scan


def log(msg: str) -> None:
    print(msg, flush=True)


def octdl_patient(path: Path) -> str:
    """The patient id of an OCTDL file name ``<class>_<patient id>_<n>.jpg``."""
    m = re.fullmatch(r"[a-z]+_(\d+)_\d+\.jpe?g", path.name, re.IGNORECASE)
    if not m:
        raise ValueError(f"{path}: not an OCTDL file name (<class>_<patient>_<n>.jpg)")
    return m.group(1)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def split_octdl(octdl: Path, *, calib_patients: int = CALIB_PATIENTS, seed: int = SPLIT_SEED) -> dict:
    """Patient-level split of OCTDL ``train/NO`` into training and calibration patients.

    A ``train/NO`` patient is excluded when its id occurs in ``val`` or when any of its images
    is byte-identical to a ``val`` image (the same eye filed under another id).
    """
    val_files = sorted(p for p in (octdl / "val").rglob("*.jp*g"))
    val_ids = {octdl_patient(p) for p in val_files}
    val_digests = {_digest(p) for p in val_files}
    by_patient: dict[str, list[Path]] = defaultdict(list)
    for p in sorted((octdl / "train" / "NO").glob("*.jp*g")):
        by_patient[octdl_patient(p)].append(p)
    excluded = sorted(pid for pid, files in by_patient.items()
                      if pid in val_ids or any(_digest(f) in val_digests for f in files))
    eligible = sorted(set(by_patient) - set(excluded))
    rng = np.random.default_rng(seed)
    calib = sorted(rng.choice(eligible, calib_patients, replace=False).tolist())
    train = sorted(set(eligible) - set(calib))
    return {
        "train": {pid: [str(f) for f in by_patient[pid]] for pid in train},
        "calib": {pid: [str(f) for f in by_patient[pid]] for pid in calib},
        "excluded": {pid: [str(f) for f in by_patient[pid]] for pid in excluded},
    }


def _link_folder(folder: Path, files: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for f in files:
        link = folder / Path(f).name
        if not link.exists():
            link.symlink_to(f)


def octpipe_cmd(*args: str, threads: int | None = None) -> None:
    """Run the ``octpipe`` command of this environment (the user's pipeline)."""
    exe = Path(sys.executable).with_name("octpipe")
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    cmd = [str(exe), *args]
    log("$ " + " ".join(cmd))
    subprocess.run(cmd, check=True, env=env)


def manifest_ids(manifest: Path) -> dict[str, str]:
    """Source file name → volume id, from an ingest manifest."""
    return {Path(r["path"]).name: r["volume_id"] for r in load_manifest(manifest) if r["status"] in ("ok", "skipped")}


def stage_data(work: Path, data: Path, workers: int) -> dict:
    """Split, ingest and cut patches: the training store and the evaluation stores."""
    from octpipe.patches import write_patch_split

    octdl = data / OCTDL
    split = split_octdl(octdl)
    (work / "split.json").write_text(json.dumps(split, indent=1) + "\n")
    src = work / "sources"
    _link_folder(src / "normal-train", [f for fs in split["train"].values() for f in fs])
    _link_folder(src / "normal-calib", [f for fs in split["calib"].values() for f in fs])
    store = work / "octdl-normal.zarr"
    octpipe_cmd("ingest", str(src / "normal-train"), str(src / "normal-calib"), "-o", str(store),
                "--label", "healthy", "--images", "bscans", "--workers", str(workers))
    ids = manifest_ids(store.with_name(store.stem + "-manifest.csv"))
    names = {k: {Path(f).name for fs in split[k].values() for f in fs} for k in ("train", "calib")}
    for name, k, kw in (("train", "train", {"k": K_TRAIN}), ("calib", "calib", {"stride": 32})):
        if (store / "patches" / name).exists():
            continue
        vids = sorted(ids[n] for n in names[k] if n in ids)
        res = write_patch_split(store, "train" if name == "train" else "test", name=name, volume_ids=vids,
                                workers=0, **kw)
        log(f"patches/{name}: {res.n_patches} patches of {res.n_volumes} B-scans")
    return split


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------
def stage_train(work: Path, threads: int) -> Path:
    """f-AnoGAN with ``octpipe train`` (resumable): the GAN, then the encoder and calibration."""
    run = work / "run-octdl"
    octpipe_cmd("train", str(work / "octdl-normal.zarr"), "-o", str(run), "--config", str(CONFIG),
                "--resume", "--threads", str(threads))
    return run


BASELINE_STEPS = {"AE": 1500, "AdvAE": 600}  # the CPU budget of benchmarks/paper_tables.py --quick


def _same_training(a: dict, b: dict) -> bool:
    """Two baseline configs train the same model (the thread count changes only the speed)."""
    return {k: v for k, v in a.items() if k != "threads"} == {k: v for k, v in b.items() if k != "threads"}


def baseline_models(work: Path, threads: int) -> dict[str, object]:
    """AE and AdvAE at f-AnoGAN's width on the same training patches (cached in WORK/baselines)."""
    import torch

    from octpipe.models.baselines import AdversarialAutoencoder, Autoencoder, BaselineConfig
    from octpipe.models.fanogan.config import load_config
    from octpipe.models.fanogan.networks import Discriminator

    fan_cfg = load_config(CONFIG)
    store = work / "octdl-normal.zarr"
    out = {}
    for name, cls in (("AE", Autoencoder), ("AdvAE", AdversarialAutoencoder)):
        cfg = BaselineConfig(image_size=fan_cfg.model.image_size, dim=fan_cfg.model.dim,
                             latent_dim=fan_cfg.model.latent_dim, iterations=BASELINE_STEPS[name], seed=0,
                             threads=threads)
        path = work / "baselines" / f"{name}.pt"
        if path.exists():
            saved = torch.load(path, map_location="cpu", weights_only=False)
            if _same_training(saved["config"], cfg.to_dict()):
                enc, dec = Autoencoder.build(cfg)
                nets = (enc, dec) if cls is Autoencoder else (enc, dec, Discriminator(dim=cfg.dim,
                                                                                      image_size=cfg.image_size))
                model = cls(*nets, cfg, saved["history"])
                for key, module in model.modules().items():
                    module.load_state_dict(saved["state"][key])
                    module.eval()
                model.train_seconds = saved["train_seconds"]
                out[name] = model
                log(f"{name}: loaded {path}")
                continue
        log(f"{name}: training {cfg.iterations} steps ...")
        model = cls.train(store, cfg)
        for module in model.modules().values():
            module.eval()
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"config": cfg.to_dict(), "state": {k: m.state_dict() for k, m in model.modules().items()},
                    "history": model.history, "train_seconds": model.train_seconds}, path)
        log(f"{name}: {model.train_seconds:.0f} s, final loss {np.mean(model.history[-50:]):.4f}")
        out[name] = model
    return out


# --------------------------------------------------------------------------------------------
# Scoring: one image score and one pixel map per method, the export's windows
# --------------------------------------------------------------------------------------------
STRIDE = 16  # the export's window stride (MapSettings.stride)
METHODS = ("f-AnoGAN", "AE", "AdvAE", "mean intensity", "dark fraction", "thickness irregularity")
#: Other readings of f-AnoGAN's image score (diagnostics: which part carries the signal).
VARIANTS = ("f-AnoGAN A_R (p99)", "f-AnoGAN A_D (p99)", "f-AnoGAN A (mean)", "f-AnoGAN A (max)")
PIXEL_METHODS = ("f-AnoGAN", "AE", "AdvAE", "darkness", "row-profile deviation")


def thickness_irregularity(layers: np.ndarray) -> float:
    """Standard deviation of the ILM-BM thickness across the B-scans' A-scans / its median."""
    t = (layers[1] - layers[0]).ravel()
    t = t[np.isfinite(t)]
    if t.size < 2 or np.median(t) <= 0:
        return float("nan")
    return float(np.std(t) / np.median(t))


def row_profile(store: Path, volume_ids: list[str]) -> np.ndarray:
    """Median intensity of each row of the flattened area over the training B-scans."""
    from octpipe.store import read_volume_group

    rows = []
    for vid in volume_ids:
        arrays, _ = read_volume_group(store, vid)
        rows.append(np.median(arrays["flat"], axis=(0, 2)))
    return np.median(np.stack(rows), axis=0).astype(np.float32)


def _reconstruction_scores(model, patches: np.ndarray, batch_size: int = 256, bf16: bool | None = None
                           ) -> tuple[np.ndarray, np.ndarray]:
    """AE / AdvAE window scores and pixel residuals from one reconstruction pass.

    The score is the baseline's own (``A_R`` for the AE, ``A = A_R + κ·A_D`` for the AdvAE, as
    their ``score()``), run with the precision f-AnoGAN's ``auto`` takes on this CPU (bf16
    autocast where the CPU has native bf16, else fp32) so that no method is handicapped.
    """
    import torch

    from octpipe.models.fanogan.score import cpu_has_native_bf16

    bf16 = cpu_has_native_bf16() if bf16 is None else bf16
    scores, residuals = [], []
    critic = getattr(model, "critic", None)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        for start in range(0, len(patches), batch_size):
            x = torch.from_numpy(np.ascontiguousarray(patches[start:start + batch_size], np.float32))[:, None]
            x = x.contiguous(memory_format=torch.channels_last)
            rec = model.reconstruct(x).float()
            diff = x - rec
            a = diff.pow(2).mean(dim=(1, 2, 3))
            if critic is not None:
                feats = critic.features(torch.cat([x, rec])).float()
                a = a + model.config.kappa * (feats[:len(x)] - feats[len(x):]).pow(2).flatten(1).mean(1)
            scores.append(a.float().numpy())
            residuals.append(diff.abs()[:, 0].numpy())
    return np.concatenate(scores), np.concatenate(residuals)


def score_volume(store: Path, vid: str, fanogan, learned: dict, trivial: dict, profile: np.ndarray) -> dict:
    """Image scores of every method and (for annotated volumes) the flattened pixel maps."""
    from octpipe.export.anomaly import MapSettings, compute_anomaly
    from octpipe.heatmap import WindowMerger, retina_mask
    from octpipe.patches import extract_patches
    from octpipe.preprocess.flatten import flatten_image
    from octpipe.store import read_prepared
    from octpipe.testing.realdata import VITREOUS_LESIONS

    vol = read_prepared(store, vid)
    settings = MapSettings(stride=STRIDE)
    res = compute_anomaly(vol, fanogan, settings)  # exactly what octpipe export computes
    size = fanogan.image_size
    idx = res.windows
    retinal = res.window_retina >= 0.5
    sel = retinal if retinal.any() else np.ones(len(idx), bool)
    patches = extract_patches(vol.flat, idx, (size, size))
    image = {"f-AnoGAN": float(res.summary["volume_score"])}
    ws = {k: v[sel] for k, v in res.window_scores.items()}
    image.update({"f-AnoGAN A_R (p99)": float(np.percentile(ws["A_R"], 99)),
                  "f-AnoGAN A_D (p99)": float(np.percentile(ws["A_D"], 99)),
                  "f-AnoGAN A (mean)": float(ws["A"].mean()), "f-AnoGAN A (max)": float(ws["A"].max())})
    maps = {"f-AnoGAN": res.residual_flat}
    for name, model in learned.items():
        a, residual = _reconstruction_scores(model, patches)
        image[name] = float(np.percentile(a[sel], 99))
        if vol.mask is not None:
            merge = WindowMerger(vol.flat.shape, size, settings.weighting)
            merge.add(idx, residual)
            maps[name] = merge.result()
    for name, model in trivial.items():
        values = next(iter(model.score(patches).values()))
        image[name] = float(np.percentile(values[sel], 99))
    image["thickness irregularity"] = thickness_irregularity(vol.layers)
    out = {"volume_id": vid, "image": image}
    if vol.mask is not None:
        geometry = vol.flatten_geometry
        mask_flat = flatten_image(vol.mask.astype(np.int16), vol.flatmap, height=geometry["height"],
                                  bm_row=geometry["bm_row"], order=0, fill=0)
        inside = retina_mask(vol.layers[0], vol.layers[1], vol.image.shape[1]).astype(np.uint8)
        inside_flat = flatten_image(inside, vol.flatmap, height=geometry["height"], bm_row=geometry["bm_row"],
                                    order=0, fill=0).astype(bool)
        maps["darkness"] = -vol.flat
        maps["row-profile deviation"] = np.abs(vol.flat - profile[None, :, None])
        keep = inside_flat
        out["pixels"] = {"mask": mask_flat[keep], **{k: maps[k][keep].astype(np.float32) for k in PIXEL_METHODS}}
        out["lesion_pixels_source"] = int(np.isin(vol.mask, [c + 1 for c in VITREOUS_LESIONS], invert=True)
                                          [vol.mask > 0].sum())
    return out


def _metrics(scores: list[float], labels: list[int]) -> dict:
    from octpipe.evaluate import image_metrics

    s = np.asarray(scores, float)
    y = np.asarray(labels, int)
    ok = np.isfinite(s)
    m = image_metrics(s[ok], y[ok]).to_dict()
    m["n_normal"], m["n_diseased"] = int((y[ok] == 0).sum()), int((y[ok] == 1).sum())
    m["auc_inverted"] = None if m["auc"] is None else round(1.0 - m["auc"], 6)
    return m


def image_tables(rows: list[dict], classes: dict[str, str], normal: str) -> dict:
    """ROC AUC / Youden statistics per method: normal vs each disease and vs all diseases."""
    by_class = defaultdict(list)
    for r in rows:
        by_class[classes[r["volume_id"]]].append(r)
    diseases = sorted(c for c in by_class if c != normal)
    tables, n_pos = {}, {}
    for target in ["all", *diseases]:
        pos = [r for c in (diseases if target == "all" else [target]) for r in by_class[c]]
        if len(pos) < 2:  # OCTDL val has one RAO B-scan: no ROC curve
            continue
        pool = by_class[normal] + pos
        labels = [0] * len(by_class[normal]) + [1] * len(pos)
        tables[target] = {m: _metrics([r["image"][m] for r in pool], labels) for m in METHODS + VARIANTS}
        n_pos[target] = len(pos)
    return {"classes": {c: len(v) for c, v in sorted(by_class.items())}, "n_normal": len(by_class[normal]),
            "n_positive": n_pos, "tables": tables}


def pixel_tables(rows: list[dict]) -> dict:
    """Pixel AUC of each method's map inside the retina, all lesion classes and per class."""
    from octpipe.evaluate import image_metrics
    from octpipe.testing.realdata import LESION_CLASSES, VITREOUS_LESIONS

    rows = [r for r in rows if "pixels" in r]
    mask = np.concatenate([r["pixels"]["mask"] for r in rows]).astype(np.int16)
    vitreous = np.isin(mask, [c + 1 for c in VITREOUS_LESIONS])
    normal = mask == 0
    out = {"n_bscans": len(rows), "n_retina_pixels": int(mask.size),
           "lesion_pixels_source": int(sum(r["lesion_pixels_source"] for r in rows)),
           "lesion_pixels_in_flat_retina": int(((mask > 0) & ~vitreous).sum()), "tables": {}}
    targets = {"all lesions": (mask > 0) & ~vitreous}
    for c, name in enumerate(LESION_CLASSES):
        if c in VITREOUS_LESIONS:
            continue
        if (mask == c + 1).sum() >= 100:
            targets[name] = mask == c + 1
    maps = {m: np.concatenate([r["pixels"][m] for r in rows]) for m in PIXEL_METHODS}  # once, not per target
    for target, pos in targets.items():
        use = normal | pos
        y = pos[use].astype(np.int8)
        out["tables"][target] = {"n_pixels": int(y.sum())}
        for m in PIXEL_METHODS:
            out["tables"][target][m] = image_metrics(maps[m][use], y).to_dict()
    return out


def manifest_classes(manifest: Path) -> dict[str, str]:
    """Volume id → class folder name (OCTDL ``val/<CLASS>/``, Kermany ``val/<CLASS>/``)."""
    return {r["volume_id"]: Path(r["path"]).parent.name.upper() for r in load_manifest(manifest)
            if r["status"] in ("ok", "skipped") and r["volume_id"]}


def stage_evaluate(work: Path, data: Path, workers: int, threads: int) -> dict:
    """Ingest the evaluation cohorts, score every B-scan with every method, build the tables."""
    import time

    import torch

    from octpipe.models.baselines import DarkFraction, MeanIntensity
    from octpipe.models.fanogan.checkpoint import load_run
    from octpipe.store import complete_volumes

    torch.set_num_threads(threads)
    cohorts = {"octdl-val": data / OCTDL / "val", "kermany-val": data / KERMANY,
               "outlines": work / "sources" / "outlines"}
    _outline_sources(data / OUTLINES, cohorts["outlines"])
    for name, src in cohorts.items():
        store = work / f"{name}.zarr"
        octpipe_cmd("ingest", str(src), "-o", str(store), "--images", "bscans", "--workers", str(workers))
    train_store = work / "octdl-normal.zarr"
    fanogan = load_run(work / "run-octdl")
    learned = baseline_models(work, threads)
    trivial = {"mean intensity": MeanIntensity.train(), "dark fraction": DarkFraction.train(train_store)}
    import zarr

    train_vids = list(zarr.open_group(str(train_store / "patches" / "train"), mode="r").attrs["volumes"])
    profile = row_profile(train_store, train_vids)
    results: dict = {}
    for name in cohorts:
        store = work / f"{name}.zarr"
        t0 = time.perf_counter()
        vids = sorted(set(complete_volumes(store).values()))
        rows = [score_volume(store, v, fanogan, learned, trivial, profile) for v in vids]
        log(f"{name}: {len(rows)} B-scans scored in {time.perf_counter() - t0:.0f} s")
        if name == "outlines":
            results[name] = pixel_tables(rows)
        else:
            classes = manifest_classes(store.with_name(store.stem + "-manifest.csv"))
            results[name] = image_tables(rows, classes, "NO" if name == "octdl-val" else "NORMAL")
            results[name]["per_bscan"] = [{"volume_id": r["volume_id"], "class": classes[r["volume_id"]],
                                           **r["image"]} for r in rows]
    return results


def _outline_sources(src: Path, folder: Path) -> None:
    """The outline images with their rasterised polygons as octpipe annotation sidecars."""
    from PIL import Image

    from octpipe.testing.realdata import lesion_polygons, rasterise_polygons

    folder.mkdir(parents=True, exist_ok=True)
    for img in sorted((src / "images").iterdir()):
        label = src / "labels" / f"{img.stem}.txt"
        if not label.exists():
            continue
        link = folder / img.name
        sidecar = folder / f"{img.name.split('.')[0]}_truth.npz"
        if link.exists() and sidecar.exists():
            continue
        with Image.open(img) as im:
            w, h = im.size
        mask = rasterise_polygons(lesion_polygons(label), (h, w))
        if not link.exists():
            link.symlink_to(img)
        np.savez_compressed(sidecar, lesion_mask=mask[None].astype(np.uint8))


# --------------------------------------------------------------------------------------------
# Figure: what octpipe export gives a user on real diseased B-scans
# --------------------------------------------------------------------------------------------
def figure_inputs(work: Path, data: Path, report: dict) -> list[tuple[str, Path, Path | None]]:
    """(title, image file, outline label file or None), chosen by a fixed rule, not by eye.

    The outline B-scan with the largest lesion area inside the retina (so that a reader can
    compare the hot spots with the drawn outlines), and the OCTDL ``val`` AMD, DME and normal
    B-scans whose f-AnoGAN image score is the median of their class (typical cases).
    """
    chosen = []
    out_rows = load_manifest(work / "outlines-manifest.csv")
    best, best_area = None, -1
    for r in out_rows:
        if r["status"] not in ("ok", "skipped") or not r["path"].endswith(".jpg"):
            continue
        sidecar = work / "sources" / r["path"]  # manifest paths are relative to the source's parent
        truth = sidecar.with_name(f"{sidecar.name.split('.')[0]}_truth.npz")
        with np.load(truth) as z:
            m = z["lesion_mask"]
        area = int(np.isin(m, [1, 3, 4, 5, 6]).sum())  # intraretinal and subretinal classes
        if area > best_area:
            best, best_area = sidecar, area
    src = data / OUTLINES
    chosen.append(("Kermany (Spectralis) with lesion outlines", best, src / "labels" / f"{best.resolve().stem}.txt"))
    rows = report["octdl-val"]["per_bscan"]
    paths = {r["volume_id"]: r["path"] for r in load_manifest(work / "octdl-val-manifest.csv") if r["volume_id"]}
    for cls in ("AMD", "DME", "NO"):
        members = sorted((r for r in rows if r["class"] == cls), key=lambda r: r["f-AnoGAN"])
        mid = members[len(members) // 2]
        path = data / OCTDL / paths[mid["volume_id"]]
        chosen.append((f"OCTDL val {cls} (median f-AnoGAN score of its class)", path, None))
    return chosen


def stage_figure(work: Path, data: Path, model: Path, report: dict, out_png: Path) -> None:
    """Export each chosen B-scan with ``octpipe export`` and put the B-scan beside its overlay."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    from octpipe.testing.realdata import VITREOUS_LESIONS, lesion_polygons

    items = figure_inputs(work, data, report)
    fig, axes = plt.subplots(len(items), 2, figsize=(12, 3.1 * len(items)), squeeze=False)
    for row, (title, path, labels) in enumerate(items):
        out = work / "figure" / f"{row}"
        octpipe_cmd("export", str(path), "-o", str(out), "--model", str(model), "--overwrite")
        overlay = next(out.rglob("overlays/bscan_000.png"))
        with Image.open(path) as im:
            raw = np.asarray(im.convert("L"))
        with Image.open(overlay) as im:
            ov = np.asarray(im.convert("RGB"))
        axes[row, 0].imshow(raw, cmap="gray")
        axes[row, 1].imshow(ov)
        if labels is not None:
            for cls, verts in lesion_polygons(labels):
                if cls in VITREOUS_LESIONS:
                    continue
                for ax, shape in ((axes[row, 0], raw.shape), (axes[row, 1], ov.shape)):
                    xy = np.vstack([verts, verts[:1]]) * [shape[1], shape[0]]
                    ax.plot(xy[:, 0], xy[:, 1], color="cyan", lw=0.8)
        summary = json.loads(next(out.rglob("summary.json")).read_text()) if list(out.rglob("summary.json")) else {}
        pct = summary.get("volume_percentile")
        axes[row, 0].set_title(f"{title}: {path.name[:40]}", fontsize=8)
        axes[row, 1].set_title("octpipe export overlay (models/fanogan-octdl)"
                               + (f", volume percentile {pct:.1f}" if pct is not None else ""), fontsize=8)
        for ax in axes[row]:
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    log(f"wrote {out_png}")


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------
BEGIN, END = "<!-- real_benchmark:begin -->", "<!-- real_benchmark:end -->"


def _f(v) -> str:
    return "–" if v is None or (isinstance(v, float) and not np.isfinite(v)) else f"{v:.3f}"


def _image_markdown(res: dict, title: str) -> list[str]:
    tables = res["tables"]
    targets = list(tables)
    head = ["method", *[f"{t} (n={res['n_positive'][t]})" for t in targets], "Youden sens / spec (all)"]
    lines = [f"**{title}** (ROC AUC, normal n={res['n_normal']})", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in METHODS + VARIANTS:
        cells = [m if m in METHODS else f"*{m}*", *[_f(tables[t][m]["auc"]) for t in targets]]
        a = tables["all"][m]
        cells.append(f"{_f(a['sensitivity'])} / {_f(a['specificity'])}")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _pixel_markdown(res: dict) -> list[str]:
    tables = res["tables"]
    targets = list(tables)
    head = ["method", *[f"{t} (px={tables[t]['n_pixels']:,})" for t in targets], "Youden sens / spec (all)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in PIXEL_METHODS:
        a = tables["all lesions"][m]
        lines.append("| " + " | ".join([m, *[_f(tables[t][m]["auc"]) for t in targets],
                                        f"{_f(a['sensitivity'])} / {_f(a['specificity'])}"]) + " |")
    return lines


def markdown(r: dict) -> str:
    d = r["data"]
    mdl = r["model"]
    lines = [BEGIN, "# Real data: f-AnoGAN trained on real normal B-scans (issue 13)", "",
             f"`{r['command']}` ({r['date']}, {r['machine']}); raw numbers "
             "`benchmarks/results/real_benchmark.json` (with every B-scan's image scores).", "",
             "## Setup", "",
             f"- **Training**: OCTDL (Optovue) `train/NO`, {d['train_patients']} patients, "
             f"{d['train_bscans']} B-scans, "
             f"{d['train_patches']:,} random 64×64 patches ({K_TRAIN} per B-scan); "
             f"**calibration**: {d['calib_patients']} other `train/NO` patients ({d['calib_bscans']} B-scans, "
             f"{d['calib_patches']:,} grid patches); left out: {d['excluded_patients']} patient(s) whose images also "
             "occur in `val` (same eye under two ids). No image of a `val` patient is used in training or "
             "calibration.",
             f"- **f-AnoGAN**: dim {mdl['dim']}, latent {mdl['latent_dim']}, WGAN-GP {mdl['critic_steps']:,} critic "
             f"steps ({mdl['generator_steps']:,} generator steps), izi_f encoder {mdl['encoder_steps']:,} steps, "
             f"κ = 1 (`pipelines/fanogan-octdl.yaml`, the bundled `models/fanogan-octdl`). "
             f"AE {BASELINE_STEPS['AE']:,} and AdvAE {BASELINE_STEPS['AdvAE']:,} steps at the same width "
             "and latent size, on the same training patches.",
             "- **Image score** (every method): the 99th percentile of the method's window scores over the "
             f"B-scan's 64×64 windows (stride {STRIDE}) at least half inside ILM..BM, the volume score of "
             "`octpipe export` (f-AnoGAN's is computed by the export's own `compute_anomaly`). Scores: "
             "f-AnoGAN A = A_R + A_D; AE A_R; AdvAE A = A_R + A_D; mean intensity −mean; dark fraction: "
             "share of dark pixels inside the tissue; thickness irregularity: std/median of the ILM-BM "
             "thickness across the B-scan (per image, no windows).",
             "- **Pixel maps** (inside ILM..BM of the flattened retina): f-AnoGAN, AE, AdvAE: the merged "
             "residual |x − x̂| of the export; darkness: −intensity; row-profile deviation: |intensity − "
             "the median normal intensity of that flattened row| (an anatomical template, no learning).",
             "", "## Image level", ""]
    lines += _image_markdown(r["octdl-val"], "OCTDL val (Optovue), normal vs each disease")
    lines += ["", *(_image_markdown(r["kermany-val"], "Cross-device: Kermany val (Spectralis), same model, "
                                                     "NORMAL vs each disease"))]
    px = r["outlines"]
    lines += ["", "## Pixel level: Kermany B-scans with lesion outlines (Table B1 layout)", "",
              f"{px['n_bscans']} B-scans, {px['n_retina_pixels']:,} retina pixels of the flattened area; lesion "
              f"pixels inside it: {px['lesion_pixels_in_flat_retina']:,} of {px['lesion_pixels_source']:,} in the "
              "outlines (vitreous classes excluded; the rest lie above the flattened area or outside ILM..BM). "
              "ROC AUC per lesion class (positives: its pixels; negatives: retina pixels of no lesion).", ""]
    lines += _pixel_markdown(px)
    lines += ["", END]
    return "\n".join(lines)


def write_results_md(section: str, path: Path = ROOT / "benchmarks" / "RESULTS.md") -> None:
    text = path.read_text()
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        tail = rest.split(END, 1)[1]
        text = head + section + tail
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.write_text(text)


BUNDLE_FILES = ("model.pt", "calibration.json", "config.yaml", "log.csv", "run.json")


def bundle(run: Path, dest: Path) -> None:
    """Copy a finished run's model, calibration, config, log and sample grids into ``dest``."""
    import shutil

    if not (run / "model.pt").is_file():
        raise SystemExit(f"{run}: no model.pt (train the encoder first)")
    dest.mkdir(parents=True, exist_ok=True)
    for name in BUNDLE_FILES:
        shutil.copy2(run / name, dest / name)
    (dest / "samples").mkdir(exist_ok=True)
    grids = sorted((run / "samples").glob("gan-*.png"))
    for src, name in ((grids[-1] if grids else None, "generated.png"),
                      (run / "samples" / "interpolation.png", "interpolation.png")):
        if src is not None and src.is_file():
            shutil.copy2(src, dest / "samples" / name)
    size = sum(f.stat().st_size for f in dest.rglob("*") if f.is_file())
    log(f"bundled {run} -> {dest} ({size / 1e6:.1f} MB)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True, help="working folder (stores, runs), outside the repo")
    ap.add_argument("--data", type=Path, default=None, help="the shared data folder (default ../shared/data)")
    ap.add_argument("--stage", default="all",
                    choices=("all", "data", "train", "baselines", "evaluate", "figure", "bundle"))
    ap.add_argument("--model", type=Path, default=None,
                    help="model for the figure (default WORK/run-octdl; e.g. models/fanogan-octdl)")
    ap.add_argument("--figure", type=Path, default=ROOT / "docs" / "real-export.png")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "real_benchmark.json")
    args = ap.parse_args(argv)
    data = args.data or shared_data()
    if data is None:
        ap.error("../shared/data not found; pass --data")
    args.work.mkdir(parents=True, exist_ok=True)
    if args.stage in ("all", "data"):
        stage_data(args.work, data, args.workers)
    if args.stage in ("all", "train"):
        stage_train(args.work, args.threads)
    if args.stage == "baselines":  # also done (or loaded) by evaluate
        baseline_models(args.work, args.threads)
    if args.stage in ("all", "evaluate"):
        results = stage_evaluate(args.work, data, args.workers, args.threads)
        report = {"benchmark": "real_benchmark", "command": "python benchmarks/real_benchmark.py "
                  + " ".join(argv if argv is not None else sys.argv[1:]).replace(str(args.work), "WORK"),
                  "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"), "machine": _machine(args.threads),
                  "data": _data_summary(args.work), "model": _model_summary(args.work / "run-octdl"),
                  "baselines": _baseline_summary(args.work), **results}
        args.out.write_text(json.dumps(report, indent=1, default=float) + "\n")
        write_results_md(markdown(report))
        log(f"wrote {args.out} and the Real data section of benchmarks/RESULTS.md")
    if args.stage == "bundle":
        bundle(args.work / "run-octdl", ROOT / "models" / "fanogan-octdl")
    if args.stage in ("all", "figure"):
        report = json.loads(args.out.read_text())
        stage_figure(args.work, data, args.model or args.work / "run-octdl", report, args.figure)
    return 0


def _machine(threads: int) -> str:
    import torch

    from octpipe.models.fanogan.score import cpu_has_native_bf16

    isa = "native bf16 (AVX-512 BF16/AMX)" if cpu_has_native_bf16() else "no native bf16"
    return (f"{os.cpu_count()}-core {platform.machine()} CPU, {isa}, {threads} torch thread(s), "
            f"torch {torch.__version__}")


def _data_summary(work: Path) -> dict:
    import zarr

    split = json.loads((work / "split.json").read_text())
    store = work / "octdl-normal.zarr"
    out = {}
    for k in ("train", "calib"):
        g = zarr.open_group(str(store / "patches" / k), mode="r")
        out[f"{k}_patients"] = len(split[k])
        out[f"{k}_bscans"] = len(g.attrs["volumes"])
        out[f"{k}_patches"] = int(g["x"].shape[0])
    out["excluded_patients"] = len(split["excluded"])
    out["excluded_ids"] = sorted(split["excluded"])
    return out


def _model_summary(run: Path) -> dict:
    from octpipe.models.fanogan.config import load_config

    cfg = load_config(run / "config.yaml")
    info = json.loads((run / "run.json").read_text())
    rows = list(csv.DictReader(open(run / "log.csv", newline="")))
    gan = [r for r in rows if r["stage"] == "gan"]
    enc = [r for r in rows if r["stage"] == "encoder"]
    return {"dim": cfg.model.dim, "latent_dim": cfg.model.latent_dim,
            "critic_steps": int(gan[-1]["critic_step"]), "generator_steps": int(gan[-1]["generator_step"]),
            "encoder_steps": int(enc[-1]["step"]) if enc else 0,
            "gan_seconds": float(gan[-1]["seconds"]), "encoder_seconds": float(enc[-1]["seconds"]) if enc else 0.0,
            "final_wasserstein": float(gan[-1]["wasserstein"]),
            "encoder_val_loss": next((float(r["val_loss"]) for r in reversed(enc) if r["val_loss"]), None),
            "stages": {k: v.get("status") for k, v in info.get("stages", {}).items()}}


def _baseline_summary(work: Path) -> dict:
    import torch

    out = {}
    for name in BASELINE_STEPS:
        saved = torch.load(work / "baselines" / f"{name}.pt", map_location="cpu", weights_only=False)
        out[name] = {"steps": saved["config"]["iterations"], "train_seconds": round(saved["train_seconds"], 1),
                     "final_loss": round(float(np.mean(saved["history"][-50:])), 5)}
    return out


if __name__ == "__main__":
    raise SystemExit(main())
