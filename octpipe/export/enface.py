"""En-face anomaly maps, the fovea and the ETDRS grid (OCT-NOTES.md §3.1-3.2). Pure functions.

Conventions: an en-face map is ``(n_bscans, n_ascans)`` in acquisition order. In physical
coordinates centred on the fovea, ``x`` (mm) points nasal and ``y`` (mm) points superior:
A-scan index increases to the right of the fundus view, where the optic disc (nasal) lies for a
right eye (OD) and the fovea's left for a left eye (OS); B-scan index increases superiorly for
``bscan_order='inferior_first'`` (Spectralis) and inferiorly for ``'superior_first'``.

The ETDRS grid has circles of 1, 3 and 6 mm diameter: the central subfield (C), and inner and
outer superior, nasal, inferior and temporal subfields (IS, IN, II, IT, OS, ON, OI, OT).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from scipy import ndimage as ndi

__all__ = [
    "ETDRS_SECTORS",
    "FovealCentre",
    "enface_projections",
    "find_fovea",
    "physical_coordinates",
    "etdrs_labels",
    "sector_table",
    "display_orientation",
]

#: ETDRS subfields in the usual order; label i + 1 in :func:`etdrs_labels`.
ETDRS_SECTORS = ("C", "IS", "IN", "II", "IT", "OS", "ON", "OI", "OT")
#: Ring radii of the ETDRS grid in mm (1, 3 and 6 mm diameters).
ETDRS_RADII_MM = (0.5, 1.5, 3.0)
#: The fovea is searched within this distance of the scan centre (scans are fovea-centred).
SEARCH_RADIUS_MM = 1.5


@dataclass(frozen=True)
class FovealCentre:
    """Where the ETDRS grid is centred.

    Attributes
    ----------
    bscan, ascan : float
        Position on the source grid (B-scan index, A-scan index).
    method : str
        ``thickness_minimum``: the thinnest retina (smoothed ILM-BM distance) within 1.5 mm of
        the scan centre; ``scan_centre`` when the thickness is unavailable or its minimum lies on
        the edge of that disc (no foveal pit found, as with central fluid).
    """

    bscan: float
    ascan: float
    method: str

    def to_dict(self) -> dict[str, object]:
        """JSON-ready form."""
        return {"bscan": round(self.bscan, 2), "ascan": round(self.ascan, 2), "method": self.method}


def enface_projections(volume_map: npt.ArrayLike, inside: npt.ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Maximum and mean of a ``(z, y, x)`` map over depth inside the retina, per (B-scan, A-scan).

    A-scans with no retina pixel get NaN.
    """
    m = np.asarray(volume_map, dtype=np.float32)
    ins = np.asarray(inside, dtype=bool)
    n = ins.sum(axis=1)
    masked = np.where(ins, m, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(n > 0, masked.sum(axis=1) / np.maximum(n, 1), np.nan)
    mx = np.where(n > 0, np.where(ins, m, -np.inf).max(axis=1), np.nan)
    return mx.astype(np.float32), mean.astype(np.float32)


def find_fovea(ilm: npt.ArrayLike, bm: npt.ArrayLike, spacing_mm: tuple[float, float, float]) -> FovealCentre:
    """The foveal centre: minimum of the smoothed retinal thickness near the scan centre.

    Parameters
    ----------
    ilm, bm : (n_bscans, n_ascans) arrays
        Boundary rows on the source grid.
    spacing_mm : (between B-scans, axial, lateral)
        Voxel spacing.

    Returns
    -------
    FovealCentre
    """
    ilm = np.asarray(ilm, dtype=np.float64)
    bm = np.asarray(bm, dtype=np.float64)
    nz, nx = ilm.shape
    dz, _, dx = spacing_mm
    thick = bm - ilm
    ok = np.isfinite(thick)
    if ok.mean() < 0.5:
        return FovealCentre((nz - 1) / 2.0, (nx - 1) / 2.0, "scan_centre")
    filled = np.where(ok, thick, np.nanmedian(thick))
    # smooth over ~0.2 mm so single-A-scan segmentation noise cannot win
    sigma = (max(0.2 / dz, 0.5) if nz > 1 else 0.0, max(0.2 / dx, 0.5))
    smooth = ndi.gaussian_filter(filled, sigma, mode="nearest")
    zz, xx = np.meshgrid(np.arange(nz), np.arange(nx), indexing="ij")
    r = np.hypot((zz - (nz - 1) / 2.0) * dz, (xx - (nx - 1) / 2.0) * dx)
    smooth = np.where(r <= SEARCH_RADIUS_MM, smooth, np.inf)
    b, a = np.unravel_index(int(np.argmin(smooth)), smooth.shape)
    if r[b, a] > 0.9 * SEARCH_RADIUS_MM:
        # no pit inside the search disc (e.g. central fluid thickens the fovea): trust the fovea-centred scan
        return FovealCentre((nz - 1) / 2.0, (nx - 1) / 2.0, "scan_centre")
    return FovealCentre(float(b), float(a), "thickness_minimum")


def physical_coordinates(shape: tuple[int, int], spacing_mm: tuple[float, float, float], centre: FovealCentre,
                         laterality: str | None, bscan_order: str | None) -> tuple[np.ndarray, np.ndarray]:
    """``(x_nasal_mm, y_superior_mm)`` of every en-face pixel, relative to the foveal centre."""
    nz, nx = shape
    dz, _, dx = spacing_mm
    zz, xx = np.meshgrid(np.arange(nz, dtype=np.float64), np.arange(nx, dtype=np.float64), indexing="ij")
    nasal_sign = -1.0 if laterality == "OS" else 1.0
    superior_sign = -1.0 if bscan_order == "superior_first" else 1.0
    return nasal_sign * (xx - centre.ascan) * dx, superior_sign * (zz - centre.bscan) * dz


def etdrs_labels(shape: tuple[int, int], spacing_mm: tuple[float, float, float], centre: FovealCentre,
                 laterality: str | None, bscan_order: str | None) -> npt.NDArray[np.int8]:
    """ETDRS subfield of every en-face pixel: 0 outside the 6 mm circle, else 1 + index in ``ETDRS_SECTORS``."""
    x, y = physical_coordinates(shape, spacing_mm, centre, laterality, bscan_order)
    r = np.hypot(x, y)
    angle = np.degrees(np.arctan2(y, x))  # 0 = nasal, 90 = superior
    quadrant = np.select([(angle > 45) & (angle <= 135), (angle > -45) & (angle <= 45),
                          (angle > -135) & (angle <= -45)], [0, 1, 2], default=3)  # S, N, I, T
    labels = np.zeros(shape, np.int8)
    labels[r <= ETDRS_RADII_MM[2]] = 6 + quadrant[r <= ETDRS_RADII_MM[2]]
    inner = r <= ETDRS_RADII_MM[1]
    labels[inner] = 2 + quadrant[inner]
    labels[r <= ETDRS_RADII_MM[0]] = 1
    return labels


def sector_table(enface: npt.ArrayLike, labels: npt.ArrayLike, spacing_mm: tuple[float, float, float]
                 ) -> list[dict[str, object]]:
    """Mean and maximum of an en-face map per ETDRS subfield, with the area the scan covers.

    Returns one row per subfield: ``sector``, ``mean``, ``max`` (None when not covered),
    ``covered_mm2`` and ``covered_fraction`` (of the subfield's full area).
    """
    e = np.asarray(enface, dtype=np.float64)
    lab = np.asarray(labels)
    dz, _, dx = spacing_mm
    r0, r1, r2 = ETDRS_RADII_MM
    full = {"C": np.pi * r0**2, "I": np.pi * (r1**2 - r0**2) / 4, "O": np.pi * (r2**2 - r1**2) / 4}
    rows: list[dict[str, object]] = []
    for i, name in enumerate(ETDRS_SECTORS):
        sel = (lab == i + 1) & np.isfinite(e)
        area = float(sel.sum() * dz * dx)
        rows.append({
            "sector": name,
            "mean": float(e[sel].mean()) if sel.any() else None,
            "max": float(e[sel].max()) if sel.any() else None,
            "covered_mm2": round(area, 3),
            "covered_fraction": round(min(area / full[name[0]], 1.0), 3),
        })
    return rows


def display_orientation(enface: npt.ArrayLike, bscan_order: str | None) -> np.ndarray:
    """Rows flipped so that superior is up (row 0 = most superior B-scan)."""
    e = np.asarray(enface)
    return e if bscan_order == "superior_first" else e[::-1]
