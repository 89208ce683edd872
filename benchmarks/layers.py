"""ILM/BM segmentation accuracy and speed: phantoms per lesion type and the real .vol files.

For each lesion type (healthy, irf, srf, ped, drusen, hrf, mixed = all five) ``--n``
seeded full-size phantoms (49x496x512 Spectralis geometry, 3.87 µm per axial px) are
segmented with :func:`octpipe.preprocess.layers.segment_ilm_bm` (default parameters,
display-domain input). Per lesion type it reports the mean absolute error (MAE), median,
95th percentile and signed bias of the ILM and BM rows against the phantom truth, in px
and µm, also over the A-scans that cross a lesion only, plus seconds per volume
(segmentation only; phantom generation is timed apart). The targets of the issue are
MAE <= 1.0 px (ILM) and <= 1.5 px (BM).

On the real Spectralis ``.vol`` files (``--real``) it reports the median and mean
absolute difference to the device's own ILM and BM, over the A-scans where the device
layer is finite (the target is a median <= 3 px).

Writes ``benchmarks/results/layers.json`` and prints it.

Usage: .venv/bin/python benchmarks/layers.py [--n 2] [--seed 0] [--real ../shared/data/real] [--out FILE]
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from octpipe.preprocess.intensity import linear_to_display  # noqa: E402
from octpipe.preprocess.layers import LayerParams, segment_ilm_bm  # noqa: E402
from octpipe.testing.phantoms import DEFAULT_SHAPE, DEFAULT_SPACING_MM, make_phantom, parse_lesion_specs  # noqa: E402

LESION_TYPES = {
    "healthy": "",
    "irf": "irf",
    "srf": "srf",
    "ped": "ped",
    "drusen": "drusen",
    "hrf": "hrf",
    "mixed": "irf,srf,ped,drusen,hrf",
}
TARGET_PX = {"ilm": 1.0, "bm": 1.5}
REAL_TARGET_PX = 3.0


def _stats(err_px: np.ndarray, dy_um: float) -> dict[str, float]:
    a = np.abs(err_px)
    out = {
        "mae_px": float(a.mean()),
        "median_px": float(np.median(a)),
        "p95_px": float(np.percentile(a, 95)),
        "bias_px": float(err_px.mean()),
    }
    out.update({k.replace("_px", "_um"): v * dy_um for k, v in list(out.items())})
    return {k: round(v, 4) for k, v in out.items()}


def _phantoms(n: int, seed: int) -> dict[str, object]:
    rows: dict[str, object] = {}
    for i, (name, spec) in enumerate(LESION_TYPES.items()):
        errs: dict[str, list[np.ndarray]] = {"ilm": [], "bm": []}
        in_lesion: dict[str, list[np.ndarray]] = {"ilm": [], "bm": []}
        seconds, gen_seconds, flags, per_volume = [], [], [], []
        for k in range(n):
            rng = np.random.default_rng(np.random.SeedSequence([seed, i, k]))
            t0 = time.perf_counter()
            ph = make_phantom(rng, shape=DEFAULT_SHAPE, spacing_mm=DEFAULT_SPACING_MM,
                              lesions=parse_lesion_specs(spec), name=f"{name}-{k}")
            gen_seconds.append(time.perf_counter() - t0)
            display = linear_to_display(ph.data)
            t0 = time.perf_counter()
            res = segment_ilm_bm(display, spacing_mm=ph.spacing_mm)
            seconds.append(time.perf_counter() - t0)
            lesion_cols = ph.lesion_mask.any(axis=1)  # (z, x): A-scans that cross a lesion
            volume = {"seed": [seed, i, k], "lesions": list(ph.lesion_types), "flags": list(res.qc["flags"])}
            for surf, truth, ours in (("ilm", ph.ilm, res.ilm), ("bm", ph.bm, res.bm)):
                e = (ours.astype(np.float64) - truth).ravel()
                errs[surf].append(e)
                in_lesion[surf].append((ours.astype(np.float64) - truth)[lesion_cols])
                volume[f"{surf}_mae_px"] = round(float(np.abs(e).mean()), 4)
            per_volume.append(volume)
            flags.extend(res.qc["flags"])
        dy_um = DEFAULT_SPACING_MM[1] * 1e3
        row: dict[str, object] = {"n_volumes": n}
        for surf in ("ilm", "bm"):
            row[surf] = _stats(np.concatenate(errs[surf]), dy_um)
            lesion = np.concatenate(in_lesion[surf])
            row[f"{surf}_in_lesion_ascans"] = _stats(lesion, dy_um) if lesion.size else None
            row[f"{surf}_meets_target"] = bool(max(v[f"{surf}_mae_px"] for v in per_volume) <= TARGET_PX[surf])
        row["seconds_per_volume"] = round(float(np.mean(seconds)), 3)
        row["phantom_generation_seconds"] = round(float(np.mean(gen_seconds)), 3)
        row["qc_flags"] = sorted(set(flags))
        row["volumes"] = per_volume
        rows[name] = row
        print(f"{name:8s} ILM MAE {row['ilm']['mae_px']:.3f} px  BM MAE {row['bm']['mae_px']:.3f} px  "
              f"{row['seconds_per_volume']:.2f} s/volume", file=sys.stderr)
    return rows


def _real_files(real: Path) -> dict[str, object]:
    from octpipe.io import read_volume

    folder = real / "halirutan_spectralis-raw-data" / "test-data"
    out: dict[str, object] = {}
    for path in sorted(folder.glob("*.vol")):
        vol = read_volume(path)
        t0 = time.perf_counter()
        res = segment_ilm_bm(linear_to_display(vol.data), spacing_mm=vol.spacing_mm, invalid=vol.invalid)
        row: dict[str, object] = {"shape": list(vol.data.shape), "scan_pattern": vol.scan_pattern,
                                  "seconds": round(time.perf_counter() - t0, 3), "qc_flags": res.qc["flags"]}
        for key, ours in (("ILM", res.ilm), ("BM", res.bm)):
            device = vol.layers.get(key)
            if device is None or not np.isfinite(device).any():
                row[key.lower()] = None
                continue
            finite = np.isfinite(device)
            d = (ours.astype(np.float64) - device)[finite]
            row[key.lower()] = {
                "n_ascans": int(finite.sum()),
                "median_abs_px": round(float(np.median(np.abs(d))), 3),
                "mean_abs_px": round(float(np.mean(np.abs(d))), 3),
                "median_signed_px": round(float(np.median(d)), 3),
                "meets_target": bool(np.median(np.abs(d)) <= REAL_TARGET_PX),
            }
        out[path.name] = row
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2, help="phantoms per lesion type (default 2)")
    parser.add_argument("--seed", type=int, default=0, help="base seed (default 0)")
    parser.add_argument("--real", type=Path, default=ROOT.parent / "shared" / "data" / "real")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "layers.json")
    args = parser.parse_args()
    if args.n < 1:
        parser.error("--n must be >= 1")

    result = {
        "what": "ILM/BM segmentation error against phantom truth and device layers",
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "phantom_shape": list(DEFAULT_SHAPE),
        "phantom_spacing_mm": list(DEFAULT_SPACING_MM),
        "axial_um_per_px": DEFAULT_SPACING_MM[1] * 1e3,
        "targets": {"phantom_mae_px": TARGET_PX, "real_median_abs_px": REAL_TARGET_PX},
        "params": {k: v for k, v in vars(LayerParams()).items()},
        "phantoms": _phantoms(args.n, args.seed),
        "real_files": _real_files(args.real) if args.real.is_dir() else None,
        "machine": {"python": platform.python_version(), "numpy": np.__version__,
                    "processor": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                    "load_average_1min": round(os.getloadavg()[0], 2)},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
