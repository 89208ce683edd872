"""How good is the bundled model ``models/fanogan-phantom``? Scores on a held-out phantom test cohort.

The test cohort (8 phantoms, seed 2000, half with lesions of every kind at default sizes;
never seen in training, whose 24 healthy phantoms used seed 1000) is made, ingested with the
paper's preprocessing and cut into a test grid of 64×64 patches (stride 32) unless ``--store``
gives one. Then:

- patch level: ROC AUC and the Youden statistics of A, A_R and A_D against the patch labels
  (1 = any lesion pixel), as in the paper's Table 1;
- pixel level: ROC AUC of the exported residual map against the lesion masks inside ILM..BM
  (the paper's Table B1), over a seeded subsample of retina pixels;
- volume level: the export's volume scores of diseased against healthy phantoms (AUC), and
  seconds per volume.

Writes ``benchmarks/results/bundled_model.json`` and prints it; the model card quotes it.

Usage: .venv/bin/python benchmarks/bundled_model.py [--store test.zarr] [--model models/fanogan-phantom]
       [--threads 2]
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _make_test_store(root: Path) -> Path:
    from octpipe.patches import write_patch_split
    from octpipe.pipeline import ingest
    from octpipe.testing.phantom_files import write_cohort
    from octpipe.testing.phantoms import make_cohort, parse_lesion_specs

    cohort = make_cohort(8, seed=2000, lesions=parse_lesion_specs("irf,srf,ped,drusen,hrf"), healthy_fraction=0.5)
    write_cohort(cohort, root / "test-src", formats=["vol"])
    store = root / "test.zarr"
    ingest([root / "test-src"], store, workers=0)
    write_patch_split(store, "test", stride=32, workers=0)
    return store


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", type=Path, default=None, help="A test store with patches/test (else one is made).")
    ap.add_argument("--model", type=Path, default=ROOT / "models" / "fanogan-phantom")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--pixels", type=int, default=2_000_000, help="Retina pixels sampled for the pixel AUC.")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "bundled_model.json")
    args = ap.parse_args()

    import torch

    from octpipe.evaluate import image_metrics, roc_auc
    from octpipe.export.run import export_volume
    from octpipe.heatmap import source_retina
    from octpipe.io.nifti import read_nifti
    from octpipe.models.fanogan.checkpoint import load_run
    from octpipe.models.fanogan.store_scores import score_store
    from octpipe.store import read_prepared, read_volume_attrs, read_volume_group, volume_ids

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        store = args.store or _make_test_store(tmp_path)
        model = load_run(args.model)
        t0 = time.perf_counter()
        scored = score_store(store, args.model, "test", tmp_path / "scores.csv", overwrite=True)
        seconds_scoring = time.perf_counter() - t0
        import csv

        with open(scored.path) as fh:
            rows = list(csv.DictReader(fh))
        labels = np.array([int(r["label"]) for r in rows])
        patch = {}
        for name in ("A", "A_R", "A_D"):
            s = np.array([float(r[name]) for r in rows])
            m = image_metrics(s, labels)
            patch[name] = {k: getattr(m, k) for k in ("auc", "precision", "sensitivity", "specificity", "f1")}

        rng = np.random.default_rng(0)
        label_parts, value_parts, vol_scores, vol_labels, seconds = [], [], [], [], []
        vids = volume_ids(store)
        per_volume = max(1, args.pixels // len(vids))
        for vid in vids:
            attrs = read_volume_attrs(store, vid)
            arrays, _ = read_volume_group(store, vid)
            t1 = time.perf_counter()
            summary = export_volume(read_prepared(store, vid), model, tmp_path / "export", dicom=False)
            seconds.append(time.perf_counter() - t1)
            vol_scores.append(summary["volume_score"])
            vol_labels.append(int(attrs["label"]))
            res = read_nifti(tmp_path / "export" / vid / "anomaly.nii.gz").data  # (z, y, x) again
            if "mask" not in arrays:
                continue
            mask_src = np.repeat(arrays["mask"], attrs["column_factor"], axis=2)[..., :res.shape[2]] > 0
            _, inside = source_retina(arrays["layers"], factor=attrs["column_factor"], n_axial=res.shape[1],
                                      n_ascans=res.shape[2])
            idx = np.flatnonzero(inside.ravel())
            take = rng.choice(idx, size=min(per_volume, idx.size), replace=False)
            label_parts.append(mask_src.ravel()[take])
            value_parts.append(res.ravel()[take])
        pixel_labels = np.concatenate(label_parts).astype(int) if label_parts else np.zeros(0, int)
        pixel_values = np.concatenate(value_parts) if value_parts else np.zeros(0)
        pixel = image_metrics(pixel_values, pixel_labels) if pixel_labels.any() else None

    report = {
        "benchmark": "bundled_model",
        "model": str(args.model.relative_to(ROOT)) if args.model.is_relative_to(ROOT) else str(args.model),
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "test_cohort": "8 phantoms, seed 2000, half diseased (irf, srf, ped, drusen, hrf at default sizes), "
                       "49x496x512, test grid of 64x64 patches at stride 32",
        "n_patches": int(labels.size), "n_anomalous_patches": int((labels == 1).sum()),
        "patch_level": patch,
        "pixel_level": None if pixel is None else {
            k: getattr(pixel, k) for k in ("auc", "precision", "sensitivity", "specificity", "f1")},
        "pixel_sample": int(pixel_labels.size),
        "volume_level": {"auc": roc_auc(vol_scores, vol_labels), "scores": vol_scores, "labels": vol_labels},
        "seconds": {"scoring_patches": round(seconds_scoring, 2), "export_per_volume_median":
                    round(float(np.median(seconds)), 2)},
        "threads": args.threads, "load_average_at_end": list(os.getloadavg()),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
