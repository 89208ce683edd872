"""Phantom realism and generation speed, against the real Spectralis .vol files.

Writes ``benchmarks/results/phantom_realism.json`` (statistics of real and phantom
B-scans, side by side, and phantom generation time) and ``docs/phantom-vs-real.png``.

Usage: .venv/bin/python benchmarks/phantom_realism.py [--real ../shared/data/real]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np

from octpipe.io.heyex_vol import read_heyex_vol
from octpipe.preprocess.intensity import linear_to_display
from octpipe.testing.phantoms import make_phantom
from octpipe.testing.realism import bscan_statistics

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--real", type=Path, default=ROOT.parent / "shared" / "data" / "real")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "phantom_realism.json")
    parser.add_argument("--figure", type=Path, default=ROOT / "docs" / "phantom-vs-real.png")
    parser.add_argument("--seeds", type=int, default=4)
    args = parser.parse_args()

    real_path = args.real / "halirutan_spectralis-raw-data" / "test-data" / "Willis_B_716_0.vol"
    vol = read_heyex_vol(real_path)
    ilm = vol.layers["ILM"][0].copy()
    ilm[650:] = np.nan  # optic disc
    real_display = linear_to_display(vol.data[0])
    real = bscan_statistics(real_display, ilm, vol.layers["BM"][0])

    per_phantom, times = [], []
    first = None
    for seed in range(args.seeds):
        t0 = time.perf_counter()
        ph = make_phantom(np.random.default_rng(seed))
        times.append(time.perf_counter() - t0)
        first = first or ph
        stats = [bscan_statistics(linear_to_display(ph.data[i]), ph.ilm[i], ph.bm[i]) for i in range(0, 49, 6)]
        per_phantom.append({k: float(np.mean([s[k] for s in stats])) for k in stats[0]})
    phantom = {k: float(np.mean([p[k] for p in per_phantom])) for k in real}
    result = {
        "real_file": real_path.name,
        "statistics": {k: {"real": round(real[k], 4), "phantom": round(phantom[k], 4),
                           "diff": round(phantom[k] - real[k], 4)} for k in real},
        "phantom_seconds_per_volume_49x496x512": {"mean": round(float(np.mean(times)), 2),
                                                  "min": round(float(np.min(times)), 2)},
        "machine": {"python": platform.python_version(), "processor": platform.processor() or platform.machine()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    i = int(np.argmin(np.abs(np.arange(49) - (24 + first.fovea_mm[0] / 0.12))))
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.6), gridspec_kw={"width_ratios": [512 * 0.0113, 768 * 0.01182]})
    for ax, img, sp, title in (
        (axes[0], linear_to_display(first.data[i]), first.spacing_mm, f"octpipe phantom (seed 0, B-scan {i}, "
                                                                       f"{first.laterality})"),
        (axes[1], real_display, vol.spacing_mm, f"real Spectralis {real_path.name} ({vol.laterality})"),
    ):
        h, w = img.shape
        ax.imshow(img, cmap="gray", vmin=0, vmax=1, extent=(0, w * sp[2], h * sp[1], 0), aspect="auto")
        ax.set(title=title, xlabel="mm", ylabel="depth, mm")
    fig.suptitle("Same display transform (log), same grey scale")
    fig.tight_layout()
    args.figure.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.figure, dpi=100)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
