"""Pictures of an anomaly map: B-scan overlays (PNG, animated GIF) and the en-face map with the ETDRS grid.

B-scan overlays are composed with numpy and Pillow (about 10 ms each, so a 49-B-scan volume
costs well under a second); the en-face figure uses matplotlib (Agg). Every picture carries the
laterality and "research use only". The colour scale is fixed and documented: the calibrated
residual from 1 (a typical healthy residual, transparent) to ``VMAX_Z`` (opaque), colour map
inferno.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageDraw, ImageFont

from octpipe.export.enface import ETDRS_RADII_MM, FovealCentre, physical_coordinates

__all__ = ["VMAX_Z", "overlay_bscan", "write_overlays", "write_gif", "write_enface_figure", "RESEARCH_ONLY"]

#: Upper end of the overlay colour scale, in units of the normal RMS residual.
VMAX_Z = 6.0
#: Lower end: residuals at or below a typical healthy one are not coloured.
VMIN_Z = 1.0
#: Printed on every picture and report.
RESEARCH_ONLY = "For research use only - not for diagnostic use"
_ILM_RGB = (80, 220, 120)
_BM_RGB = (80, 170, 255)


def _lut(name: str = "inferno") -> np.ndarray:
    import matplotlib

    return (matplotlib.colormaps[name](np.linspace(0.0, 1.0, 256))[:, :3] * 255).astype(np.uint8)


_LUT: np.ndarray | None = None


def _colour_lut() -> np.ndarray:
    global _LUT
    if _LUT is None:
        _LUT = _lut()
    return _LUT


def overlay_bscan(background: npt.ArrayLike, zmap: npt.ArrayLike, *, ilm: npt.ArrayLike | None = None,
                  bm: npt.ArrayLike | None = None, title: str = "", vmax: float = VMAX_Z) -> npt.NDArray[np.uint8]:
    """One B-scan with the anomaly map blended over it, ILM/BM lines, a title strip and a colour bar.

    Parameters
    ----------
    background : (h, w) array in [0, 1]
        The B-scan as displayed.
    zmap : (h, w) array
        Calibrated residual (0 outside the retina).
    ilm, bm : (w,) arrays, optional
        Boundary rows, drawn as lines.
    title : str
        Text of the strip above the image.
    vmax : float
        Residual mapped to the top of the colour scale.

    Returns
    -------
    ndarray of uint8, shape (h + 40, w + 60, 3)
    """
    bg = np.clip(np.asarray(background, dtype=np.float32), 0, 1)
    z = np.nan_to_num(np.asarray(zmap, dtype=np.float32))
    h, w = bg.shape
    lut = _colour_lut()
    level = np.clip((z - VMIN_Z) / (vmax - VMIN_Z), 0.0, 1.0)
    colour = lut[(level * 255).astype(np.int64)].astype(np.float32)
    alpha = (0.75 * level)[..., None]
    gray = np.repeat((bg * 255.0)[..., None], 3, axis=2)
    rgb = (gray * (1 - alpha) + colour * alpha).astype(np.uint8)
    cols = np.arange(w)
    for rows, c in ((ilm, _ILM_RGB), (bm, _BM_RGB)):
        if rows is None:
            continue
        r = np.asarray(rows, dtype=np.float64)
        ok = np.isfinite(r)
        rr = np.clip(np.round(r[ok]).astype(np.int64), 0, h - 1)
        rgb[rr, cols[ok]] = c
    canvas = np.zeros((h + 40, w + 60, 3), np.uint8)
    canvas[24:24 + h, :w] = rgb
    # colour bar: 0 at the bottom, vmax at the top
    bar_top, bar_bottom = 34, h + 14
    values = np.linspace(vmax, 0.0, bar_bottom - bar_top)
    bar_level = np.clip((values - VMIN_Z) / (vmax - VMIN_Z), 0, 1)
    canvas[bar_top:bar_bottom, w + 8:w + 20] = lut[(bar_level * 255).astype(np.int64)][:, None, :]
    image = Image.fromarray(canvas)
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    draw.text((4, 5), title, fill=(255, 255, 255), font=font)
    for v in (0, VMIN_Z, vmax / 2, vmax):
        y = bar_top + (vmax - v) / vmax * (bar_bottom - bar_top - 1)
        draw.text((w + 23, y - 5), f"{v:g}", fill=(220, 220, 220), font=font)
    draw.text((w + 4, 20), "z", fill=(220, 220, 220), font=font)
    draw.text((4, h + 27), "research use only", fill=(255, 210, 90), font=font)
    return np.asarray(image)


def _bscan_title(i: int, n: int, meta: dict[str, Any]) -> str:
    lat = meta.get("laterality") or "laterality ?"
    y = meta.get("y_mm")
    pos = f" y={y[i]:+.2f} mm" if y is not None else ""
    return f"{lat}  B-scan {i + 1}/{n}{pos}"


def write_overlays(out_dir: str | Path, background: np.ndarray, zmap: np.ndarray, layers: np.ndarray,
                   meta: dict[str, Any]) -> list[np.ndarray]:
    """One PNG per B-scan, ``bscan_000.png`` ..., in acquisition order; returns the RGB frames written.

    The frames are returned so that the GIF and the DICOM Secondary Capture reuse them instead of
    decoding the PNGs again.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    n = background.shape[0]
    frames = []
    for i in range(n):
        rgb = overlay_bscan(background[i], zmap[i], ilm=layers[0, i], bm=layers[1, i], title=_bscan_title(i, n, meta))
        Image.fromarray(rgb).save(out / f"bscan_{i:03d}.png", optimize=False, compress_level=1)
        frames.append(rgb)
    return frames


def write_gif(path: str | Path, frames: list[np.ndarray], *, max_width: int = 400, ms_per_frame: int = 120) -> Path:
    """An animated GIF through the volume (frames scaled to ``max_width``)."""
    p = Path(path)
    images = []
    for f in frames:
        im = Image.fromarray(f)
        if im.width > max_width:
            im = im.resize((max_width, round(im.height * max_width / im.width)), Image.Resampling.BILINEAR)
        images.append(im.convert("P", palette=Image.Palette.ADAPTIVE, colors=128))
    images[0].save(p, save_all=True, append_images=images[1:], duration=ms_per_frame, loop=0, optimize=False)
    return p


def write_enface_figure(path: str | Path, enface: np.ndarray, *, spacing_mm: tuple[float, float, float],
                        centre: FovealCentre, laterality: str | None, bscan_order: str | None,
                        sectors: list[dict[str, Any]], title: str, vmax: float = VMAX_Z,
                        units: str = "residual / normal RMS") -> Path:
    """The en-face map at its physical aspect ratio, superior up, nasal/temporal marked, ETDRS grid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nz, nx = enface.shape
    x, y = physical_coordinates(enface.shape, spacing_mm, centre, laterality, bscan_order)
    # draw in fundus-view coordinates: horizontal = A-scan direction (mm from the fovea, right = higher
    # A-scan index), vertical = superior up
    xs = (np.arange(nx) - centre.ascan) * spacing_mm[2]
    order = np.argsort(y[:, 0])[::-1]  # rows from most superior to most inferior
    img = enface[order]
    y_top, y_bottom = float(y[order[0], 0]), float(y[order[-1], 0])
    dz = spacing_mm[0]
    extent = (xs[0] - spacing_mm[2] / 2, xs[-1] + spacing_mm[2] / 2, y_bottom - dz / 2, y_top + dz / 2)
    fig, ax = plt.subplots(figsize=(6.4, 6.0), dpi=100)
    shown = ax.imshow(img, cmap="inferno", vmin=0.0, vmax=vmax, extent=extent, aspect="equal",
                      interpolation="nearest")
    theta = np.linspace(0, 2 * np.pi, 361)
    for r in ETDRS_RADII_MM:
        ax.plot(r * np.cos(theta), r * np.sin(theta), color="white", lw=0.8)
    for angle in (45, 135, 225, 315):
        a = np.radians(angle)
        ax.plot([ETDRS_RADII_MM[0] * np.cos(a), ETDRS_RADII_MM[2] * np.cos(a)],
                [ETDRS_RADII_MM[0] * np.sin(a), ETDRS_RADII_MM[2] * np.sin(a)], color="white", lw=0.8)
    # sector means at the sector centres (x flips for OS so that labels sit in their anatomical place)
    nasal_sign = -1.0 if laterality == "OS" else 1.0
    centres = {"C": (0, 0)}
    for ring, radius in (("I", 1.0), ("O", 2.25)):
        for q, (dx_, dy_) in zip("SNIT", ((0, 1), (1, 0), (0, -1), (-1, 0)), strict=True):
            centres[ring + q] = (nasal_sign * dx_ * radius, dy_ * radius)
    for row in sectors:
        if row["mean"] is None:
            continue
        cx, cy = centres[row["sector"]]
        ax.text(cx, cy, f"{row['mean']:.2f}", color="cyan", ha="center", va="center", fontsize=8)
    ax.set_xlim(min(extent[0], -3.1), max(extent[1], 3.1))
    ax.set_ylim(min(extent[2], -3.1), max(extent[3], 3.1))
    left, right = ("T", "N") if nasal_sign > 0 else ("N", "T")
    ax.text(0.01, 0.5, left, transform=ax.transAxes, color="black", fontsize=13, va="center", ha="left",
            bbox={"facecolor": "white", "alpha": 0.7, "lw": 0})
    ax.text(0.99, 0.5, right, transform=ax.transAxes, color="black", fontsize=13, va="center", ha="right",
            bbox={"facecolor": "white", "alpha": 0.7, "lw": 0})
    ax.text(0.5, 0.99, "S", transform=ax.transAxes, fontsize=13, va="top", ha="center",
            bbox={"facecolor": "white", "alpha": 0.7, "lw": 0})
    ax.text(0.5, 0.01, "I", transform=ax.transAxes, fontsize=13, va="bottom", ha="center",
            bbox={"facecolor": "white", "alpha": 0.7, "lw": 0})
    ax.plot([0], [0], "+", color="cyan", ms=10)
    ax.set_xlabel("mm from the fovea (A-scan direction)")
    ax.set_ylabel("mm from the fovea (superior up)")
    ax.set_title(f"{title}\n{laterality or 'laterality unknown'} - ETDRS 1/3/6 mm - {RESEARCH_ONLY}", fontsize=8)
    fig.colorbar(shown, ax=ax, label=units, shrink=0.8)
    fig.tight_layout()
    p = Path(path)
    fig.savefig(p)
    plt.close(fig)
    return p

