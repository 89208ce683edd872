"""ILM/BM segmentation on every real B-scan in ../shared/data: found, flagged, error.

For each real input (``octpipe.testing.realdata.real_bscans``: the multi-vendor raw scans,
the Spectralis ``.vol``/E2E, Topcon FDA, Zeiss ONH, OCTDL, Kermany and the Kermany B-scans
with lesion outlines) it runs what ``octpipe layers`` runs (read, fill regions invalid,
spacing estimated when the file has none, full-resolution segmentation, octpipe's own
layers) and records:

- found: the retina was found (no ``no_retina`` flag);
- flagged: any QC flag, and which;
- ILM error against the label maps' retina top edge (BilalHassan, rescaled to the raw
  scan) and the Zeiss layer masks, median and mean absolute error in px;
- ILM and BM error against the device's own layers (Spectralis ``.vol``);
- lesion containment: the share of lesion-outline pixels (Kermany polygons, inside-retina
  classes) between ILM and BM + 10 px;
- the resize test: a Kermany and an OCTDL normal B-scan resized by 0.5x and 2x (both axes,
  and each axis alone), boundaries scaled back, with the spacing estimate and, for
  comparison, with the fixed default spacing.

Writes ``benchmarks/results/layers_real.json`` (per file, per source and per vendor) and,
with ``--figure``, ``docs/layers-real.png`` (12 real B-scans with their boundaries).

Usage: .venv/bin/python benchmarks/layers_real.py [--data ../shared/data] [--per-folder N]
       [--figure docs/layers-real.png] [--out benchmarks/results/layers_real.json]
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import platform
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from octpipe.io import read_volume  # noqa: E402
from octpipe.preprocess.prepare import segment_source  # noqa: E402
from octpipe.testing.realdata import (  # noqa: E402
    VITREOUS_LESIONS,
    label_ilm,
    lesion_polygons,
    rasterise_polygons,
    real_bscans,
    shared_data,
    zeiss_ilm,
)

BM_MARGIN_PX = 10


def _err(ours: np.ndarray, truth: np.ndarray) -> dict[str, float] | None:
    ok = np.isfinite(ours) & np.isfinite(truth)
    if not ok.any():
        return None
    d = np.abs(ours[ok] - truth[ok])
    return {"median_px": float(np.median(d)), "mae_px": float(d.mean()), "p95_px": float(np.percentile(d, 95)),
            "n": int(ok.sum())}


def evaluate_item(item) -> dict:
    """Segment one real input and compare it with its truth."""
    t0 = time.perf_counter()
    rec: dict = {"file": item.path.name, "source": item.source, "vendor": item.vendor}
    try:
        vol = read_volume(item.path)
        res, vol = segment_source(vol, use_vendor=False)
    except Exception as exc:  # a benchmark records every failure, whatever it is
        rec.update(error=f"{type(exc).__name__}: {exc}", found=False, flags=["error"])
        return rec
    rec.update(shape=list(vol.shape), spacing_mm=[float(s) for s in vol.spacing_mm],
               spacing_source=vol.spacing_source, flags=list(res.qc["flags"]),
               found="no_retina" not in res.qc["flags"], thickness_um=res.qc["thickness_um"],
               relative_contrast=res.qc.get("relative_contrast"), seconds=round(time.perf_counter() - t0, 3))
    ilm, bm = res.ilm[0].astype(np.float64), res.bm[0].astype(np.float64)
    if item.truth == "labels":
        rec["ilm_vs_labels"] = _err(ilm, label_ilm(item.truth_path, vol.shape[1:]))
    elif item.truth == "zeiss_mask":
        rec["ilm_vs_labels"] = _err(ilm, zeiss_ilm(item.truth_path))
    elif item.truth == "device" and "ILM" in vol.layers and "BM" in vol.layers:
        rec["ilm_vs_device"] = _err(ilm, vol.layers["ILM"][0].astype(np.float64))
        rec["bm_vs_device"] = _err(bm, vol.layers["BM"][0].astype(np.float64))
    elif item.truth == "lesions":
        polys = lesion_polygons(item.truth_path)
        lab = rasterise_polygons(polys, vol.shape[1:], exclude=VITREOUS_LESIONS)
        rows = np.arange(vol.shape[1])[:, None]
        inside = (rows >= ilm[None, :] - 0.5) & (rows <= bm[None, :] + BM_MARGIN_PX)
        per_class = {}
        for c in np.unique(lab[lab > 0]):
            sel = lab == c
            per_class[int(c) - 1] = [int(sel.sum()), int((sel & inside).sum())]
        rec["lesion_pixels"] = per_class
    return rec


def _summary(records: list[dict], key: str) -> dict:
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        groups[r[key]].append(r)
    out = {}
    for name, rs in sorted(groups.items()):
        flags: dict[str, int] = defaultdict(int)
        for r in rs:
            for f in r.get("flags", []):
                flags[f] += 1
        row = {"bscans": len(rs), "found": sum(bool(r.get("found")) for r in rs),
               "flagged": sum(bool(r.get("flags")) for r in rs), "flags": dict(flags),
               "errors": sum("error" in r for r in rs)}
        for metric in ("ilm_vs_labels", "ilm_vs_device", "bm_vs_device"):
            vals = [r[metric] for r in rs if r.get(metric)]
            if vals:
                row[metric] = {"median_of_medians_px": float(np.median([v["median_px"] for v in vals])),
                               "mean_mae_px": float(np.mean([v["mae_px"] for v in vals])), "files": len(vals)}
        les = [r["lesion_pixels"] for r in rs if r.get("lesion_pixels")]
        if les:
            tot = sum(v[0] for d in les for v in d.values())
            inn = sum(v[1] for d in les for v in d.values())
            row["lesion_inside_fraction"] = inn / tot if tot else None
        out[name] = row
    return out


def lesion_table(records: list[dict]) -> dict:
    """Share of lesion pixels between ILM and BM + margin, per lesion class."""
    from octpipe.testing.realdata import LESION_CLASSES

    tot: dict[int, list[int]] = defaultdict(lambda: [0, 0])
    for r in records:
        for c, (n, k) in r.get("lesion_pixels", {}).items():
            tot[int(c)][0] += n
            tot[int(c)][1] += k
    return {LESION_CLASSES[c]: {"pixels": n, "inside_fraction": k / n if n else None}
            for c, (n, k) in sorted(tot.items())}


def resize_test(paths: list[Path]) -> list[dict]:
    """Boundaries of resized copies, scaled back, against the original's."""
    from PIL import Image

    from octpipe.io.images import DEFAULT_SPACING_MM, fill_mask
    from octpipe.preprocess.layers import segment_ilm_bm
    from octpipe.preprocess.scale import estimate_spacing

    def seg(a: np.ndarray, estimate: bool) -> tuple[np.ndarray, np.ndarray, tuple]:
        d = (a.astype(np.float32) / 255.0)[None]
        inv = fill_mask(a.astype(np.float32))[None]
        sp = estimate_spacing(d, DEFAULT_SPACING_MM, invalid=inv)[0] if estimate else DEFAULT_SPACING_MM
        r = segment_ilm_bm(d, spacing_mm=sp, invalid=inv)
        return r.ilm[0].astype(np.float64), r.bm[0].astype(np.float64), sp

    out = []
    for path in paths:
        im = Image.open(path).convert("L")
        w, h = im.size
        for estimate in (True, False):
            base = seg(np.asarray(im), estimate)
            for sy, sx in ((0.5, 0.5), (2.0, 2.0), (0.5, 1.0), (2.0, 1.0), (1.0, 0.5), (1.0, 2.0)):
                a = np.asarray(im.resize((round(w * sx), round(h * sy)), Image.BICUBIC))
                ilm, bm, sp = seg(a, estimate)
                xs = (np.arange(w) + 0.5) * a.shape[1] / w - 0.5
                ry = h / a.shape[0]
                back = [(np.interp(xs, np.arange(a.shape[1]), s) + 0.5) * ry - 0.5 for s in (ilm, bm)]
                di, db = np.abs(back[0] - base[0]), np.abs(back[1] - base[1])
                out.append({"file": path.name, "estimate": estimate, "scale_axial": sy, "scale_lateral": sx,
                            "spacing_um": [sp[1] * 1e3, sp[2] * 1e3],
                            "ilm_median_px": float(np.median(di)), "ilm_p90_px": float(np.percentile(di, 90)),
                            "bm_median_px": float(np.median(db)), "bm_p90_px": float(np.percentile(db, 90))})
    return out


def figure(records: list[dict], items: dict, out: Path) -> None:
    """12 real B-scans of different sources with ILM (green) and BM (red)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from octpipe.preprocess.intensity import display_full_scale, to_display

    by_source: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        if "error" not in r:
            by_source[r["source"]].append(r)
    wanted = ["bilalhassan-raw"] * 4 + ["spectralis-vol", "zeiss-onh", "octdl-train-NO", "octdl-val-AMD",
                                       "octdl-val-DME", "kermany-CNV", "kermany-DRUSEN", "kermany-lesions"]
    chosen, used = [], defaultdict(int)
    for src in wanted:
        pool = by_source.get(src, [])
        if src == "bilalhassan-raw":  # one per vendor
            vendors = ["spectralis", "cirrus", "topcon", "bioptigen"]
            pool = [r for r in pool if r["vendor"] == vendors[used[src]]] or pool
            pick = pool[len(pool) // 2] if pool else None
        else:
            pick = pool[(used[src] * 7 + len(pool) // 3) % len(pool)] if pool else None
        used[src] += 1
        if pick is not None:
            chosen.append(pick)
    fig, axs = plt.subplots(4, 3, figsize=(13.5, 10.5))
    for ax, rec in zip(axs.flat, chosen, strict=False):
        item = items[(rec["source"], rec["file"])]
        vol = read_volume(item.path)
        res, vol = segment_source(vol)
        d = to_display(vol.data, domain=vol.intensity, full_scale=display_full_scale(vol.meta, vol.data))[0]
        ax.imshow(d, cmap="gray", aspect="auto", vmin=0, vmax=float(np.percentile(d, 99.5)) or 1.0)
        ax.plot(res.ilm[0], color="#2ecc40", lw=0.8)
        ax.plot(res.bm[0], color="#ff4136", lw=0.8)
        flags = ", ".join(res.qc["flags"]) or "no flags"
        ax.set_title(f"{rec['source']} ({rec['vendor']}): {flags}", fontsize=8)
        ax.axis("off")
    for ax in axs.flat[len(chosen):]:
        ax.axis("off")
    fig.suptitle("octpipe ILM (green) and BM (red) on real B-scans of six devices, spacing estimated where unknown",
                 fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=None, help="../shared/data (default: beside the checkout)")
    ap.add_argument("--per-folder", type=int, default=None, help="at most N files per cohort folder (default all)")
    ap.add_argument("--figure", type=Path, default=None, help="write the overlay figure here")
    ap.add_argument("--no-resize", action="store_true", help="skip the resize test")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "layers_real.json")
    args = ap.parse_args()
    data = args.data or shared_data(ROOT)
    if data is None:
        print("no ../shared/data found", file=sys.stderr)
        return 1
    items = {(it.source, it.path.name): it for it in real_bscans(data, per_folder=args.per_folder)}
    t0 = time.perf_counter()
    records = []
    for i, item in enumerate(items.values()):
        records.append(evaluate_item(item))
        if (i + 1) % 50 == 0:
            print(f"{i + 1}/{len(items)} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    co = data / "cohorts"
    resize = [] if args.no_resize else resize_test([
        co / "Goodsea_heysaw/deploy/val/NORMAL/NORMAL-4872585-1.jpeg",
        co / "code-world-ad_OpticIntel-OCT-Disease-Detection-System/dataset/train/NO/no_1425855_1.jpg",
    ])
    result = {
        "benchmark": "layers_real",
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "processor": platform.processor()},
        "command": "benchmarks/layers_real.py" + (f" --per-folder {args.per_folder}" if args.per_folder else ""),
        "seconds": round(time.perf_counter() - t0, 1),
        "per_vendor": _summary(records, "vendor"),
        "per_source": _summary(records, "source"),
        "lesions": lesion_table(records),
        "resize": resize,
        "files": records,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1, default=float) + "\n")
    if args.figure:
        figure(records, items, args.figure)
    print(json.dumps({k: result[k] for k in ("per_vendor", "lesions", "seconds")}, indent=1, default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
