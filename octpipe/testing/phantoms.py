"""Seeded synthetic Spectralis-like retinas with known truth.

A phantom is built the way an OCT image is formed, in physical units:

1. **Anatomy.** Fourteen surfaces (ILM ... Bruch's membrane, choroid/sclera) are laid
   out per A-scan from layer thicknesses in µm that depend on the distance to the fovea
   (inner layers vanish in the foveal pit, the ONL and photoreceptor outer segments
   thicken there), plus curvature, tilt and a random fovea position.
2. **Lesions** open space in the stack: fluid pockets and deposits are inserted at an
   anatomical level and lift every surface above them (subretinal fluid under the
   photoreceptors, PED and drusen under the RPE, cysts inside INL/ONL, hyperreflective
   foci without displacement). Bruch's membrane never moves, as in real eyes.
3. **Reflectivity.** Each band gets a display level calibrated on the real Spectralis
   ``.vol`` files (log display domain, see :mod:`octpipe.preprocess.intensity`), rendered
   with exact sub-pixel partial volume, then retinal vessels with their shadows, choroidal
   vessel texture, depth fall-off, optical blur and correlated multiplicative speckle.
   Output is **linear reflectivity**, as a ``.vol`` stores it.

The truth (every surface, ILM and BM rows per A-scan, a lesion label mask, the lesion
list, healthy/diseased) comes with the image. Row convention: pixel ``r`` covers rows
``[r - 0.5, r + 0.5)``; a boundary at row ``y`` separates pixel centres above ``y`` from
those below, the same convention as Heyex layer positions.

Examples
--------
>>> rng = np.random.default_rng(0)
>>> ph = make_phantom(rng, shape=(3, 248, 256), spacing_mm=(0.24, 0.00774, 0.0226))
>>> ph.data.shape, ph.data.dtype.name, ph.ilm.shape
((3, 248, 256), 'float32', (3, 256))
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
from scipy import ndimage as ndi

from octpipe.preprocess.intensity import display_to_linear
from octpipe.volume import OctVolume

__all__ = [
    "LESION_LABELS",
    "LesionSpec",
    "Phantom",
    "make_phantom",
    "make_cohort",
    "parse_lesion_specs",
    "DEFAULT_SHAPE",
    "DEFAULT_SPACING_MM",
]

PHANTOM_VERSION = 1
DEFAULT_SHAPE = (49, 496, 512)
#: (between B-scans, axial, lateral) in mm: a Spectralis 20°x20° 49-line volume.
DEFAULT_SPACING_MM = (0.12, 0.00387, 0.0113)

#: Lesion label values in :attr:`Phantom.lesion_mask` (0 = no lesion).
LESION_LABELS = {"irf": 1, "srf": 2, "ped": 3, "drusen": 4, "hrf": 5}

# Surfaces from the vitreous down. BM is the lower edge of the bright RPE/BM complex,
# which is where Heyex puts its BM line (checked on the real .vol files).
SURFACES = (
    "ILM", "NFL/GCL", "GCL/IPL", "IPL/INL", "INL/OPL", "OPL/ONL", "ELM", "ELM/IS",
    "EZ", "EZ/OS", "IZ", "IZ/RPE", "RPE/BM", "BM", "CHOROID/SCLERA",
)
_S = {name: i for i, name in enumerate(SURFACES)}

# Band display levels (log display domain, 0..1) of the layer below each surface, read
# off averaged depth profiles of the real Spectralis files; index 0 is the vitreous.
_LEVELS = np.array([
    0.042,  # vitreous
    0.63,   # NFL
    0.54,   # GCL
    0.57,   # IPL
    0.40,   # INL
    0.48,   # OPL
    0.29,   # ONL (with Henle fibres)
    0.44,   # ELM
    0.31,   # myoid zone
    0.93,   # ellipsoid zone
    0.60,   # outer segments
    0.86,   # interdigitation zone
    0.83,   # RPE
    0.76,   # Bruch's membrane
    0.0,    # choroid: rendered separately (_CHOROID_LEVEL, texture, fall-off)
    0.0,    # sclera
])

# Top of the choroid, display level, before texture and fall-off.
_CHOROID_LEVEL = 0.45

# Lesion contents, display levels.
_LESION_LEVEL = {"irf": 0.10, "srf": 0.09, "ped": 0.14, "drusen": 0.62, "hrf": 0.90}

# Default per-lesion sizes: (count range, lateral radius range mm, height range µm).
_LESION_DEFAULTS = {
    "irf": ((2, 6), (0.08, 0.30), (40.0, 200.0)),
    "srf": ((1, 1), (0.5, 1.3), (50.0, 250.0)),
    "ped": ((1, 1), (0.3, 0.9), (80.0, 350.0)),
    "drusen": ((3, 10), (0.05, 0.18), (20.0, 80.0)),
    "hrf": ((4, 15), (0.012, 0.025), (10.0, 25.0)),
}


@dataclass(frozen=True)
class LesionSpec:
    """What lesions of one kind to put into a phantom.

    Parameters
    ----------
    kind : {"irf", "srf", "ped", "drusen", "hrf"}
        Intraretinal fluid cysts, subretinal fluid, pigment epithelial detachment,
        drusen, hyperreflective foci.
    count : int or (int, int), optional
        How many (a range is drawn uniformly, inclusive). Default per kind.
    radius_mm : float or (float, float), optional
        Lateral radius of each lesion in mm (a range is drawn uniformly).
    height_um : float or (float, float), optional
        Axial height of each lesion in µm.
    """

    kind: str
    count: int | tuple[int, int] | None = None
    radius_mm: float | tuple[float, float] | None = None
    height_um: float | tuple[float, float] | None = None

    def __post_init__(self) -> None:
        if self.kind not in LESION_LABELS:
            raise ValueError(f"lesion kind must be one of {sorted(LESION_LABELS)}, got {self.kind!r}")
        for name in ("count", "radius_mm", "height_um"):
            value = getattr(self, name)
            if value is None:
                continue
            lo, hi = _as_range(value)
            if not (0 <= lo <= hi) or (name != "count" and hi <= 0):
                raise ValueError(f"{self.kind} {name} must be a positive value or range, got {value!r}")

    def resolved(self) -> tuple[tuple[int, int], tuple[float, float], tuple[float, float]]:
        """(count range, radius range mm, height range µm), defaults filled in."""
        count, radius, height = _LESION_DEFAULTS[self.kind]
        count = count if self.count is None else _as_range(self.count)
        radius = radius if self.radius_mm is None else _as_range(self.radius_mm)
        height = height if self.height_um is None else _as_range(self.height_um)
        counts = (int(count[0]), int(count[1]))
        return counts, (float(radius[0]), float(radius[1])), (float(height[0]), float(height[1]))


def _as_range(value: float | tuple[float, float]) -> tuple[float, float]:
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"a range needs two values, got {value!r}")
        return float(value[0]), float(value[1])
    return float(value), float(value)


def parse_lesion_specs(text: str) -> tuple[LesionSpec, ...]:
    """Parse ``"irf:4:0.2,srf,ped:1:0.6:200"`` into lesion specs.

    Each comma-separated item is ``KIND[:COUNT[:RADIUS_MM[:HEIGHT_UM]]]``; COUNT may be a
    range ``2-5``. ``"none"`` or an empty string gives no lesions.

    Examples
    --------
    >>> parse_lesion_specs("irf:2-4:0.2,srf")[0].count
    (2, 4)
    """
    text = text.strip().lower()
    if text in ("", "none"):
        return ()
    specs = []
    for item in text.split(","):
        parts = [p.strip() for p in item.split(":")]
        kind = parts[0]
        if kind not in LESION_LABELS:
            raise ValueError(f"unknown lesion kind {kind!r} in {text!r}; known: {', '.join(LESION_LABELS)}")
        if len(parts) > 4:
            raise ValueError(f"lesion item {item!r} has more than KIND:COUNT:RADIUS_MM:HEIGHT_UM")
        values: list[object] = [None, None, None]
        for i, part in enumerate(parts[1:]):
            match = re.fullmatch(r"([0-9.]+)(?:-([0-9.]+))?", part)
            if not match:
                raise ValueError(f"cannot read {part!r} in lesion item {item!r}")
            lo = float(match.group(1))
            hi = float(match.group(2)) if match.group(2) else lo
            values[i] = (int(lo), int(hi)) if i == 0 else (lo, hi)
        specs.append(LesionSpec(kind, *values))  # type: ignore[arg-type]
    return tuple(specs)


@dataclass(frozen=True)
class Phantom:
    """A synthetic volume and its truth.

    Attributes
    ----------
    data : ndarray of float32, shape (n_bscans, n_axial, n_ascans)
        Linear reflectivity (Spectralis-like, about [0, 1]).
    surfaces : ndarray of float32, shape (len(SURFACES), n_bscans, n_ascans)
        Row of every anatomical surface, see :data:`SURFACES`.
    lesion_mask : ndarray of uint8, same shape as ``data``
        Lesion label per pixel (:data:`LESION_LABELS`), 0 elsewhere.
    lesions : tuple of dict
        One dict per lesion: kind, label, centre (z, x) in mm, radius_mm, height_um.
    spacing_mm : tuple of float
        (between B-scans, axial, lateral) in mm.
    laterality : {"OD", "OS"}
    fovea_mm : tuple of float
        Fovea centre (z, x) in mm from the volume centre.
    name : str
        A pseudonymous name, e.g. ``"phantom-0003"``.
    seed : int or None
        Seed the cohort used for this phantom, when known.
    """

    data: npt.NDArray[np.float32]
    surfaces: npt.NDArray[np.float32]
    lesion_mask: npt.NDArray[np.uint8]
    lesions: tuple[dict[str, object], ...]
    spacing_mm: tuple[float, float, float]
    laterality: str
    fovea_mm: tuple[float, float]
    name: str = "phantom"
    seed: int | None = None
    meta: dict[str, object] = field(default_factory=dict)

    @property
    def ilm(self) -> npt.NDArray[np.float32]:
        """ILM row per A-scan, shape (n_bscans, n_ascans)."""
        return self.surfaces[_S["ILM"]]

    @property
    def bm(self) -> npt.NDArray[np.float32]:
        """Bruch's membrane row per A-scan (lower edge of the RPE/BM complex)."""
        return self.surfaces[_S["BM"]]

    @property
    def lesion_types(self) -> tuple[str, ...]:
        """Kinds of lesion present, sorted by label."""
        kinds = {str(lesion["kind"]) for lesion in self.lesions}
        return tuple(sorted(kinds, key=LESION_LABELS.__getitem__))

    @property
    def diseased(self) -> bool:
        """True when any lesion pixel is present."""
        return bool(self.lesion_mask.any())

    def to_volume(self) -> OctVolume:
        """The phantom as an :class:`~octpipe.volume.OctVolume` (ILM/BM as vendor layers)."""
        return OctVolume(
            data=self.data,
            spacing_mm=self.spacing_mm,
            spacing_source="file",
            laterality=self.laterality,  # type: ignore[arg-type]
            scan_pattern="volume" if self.data.shape[0] > 1 else "line",
            vendor="octpipe-phantom",
            intensity="linear",
            layers={"ILM": self.ilm.copy(), "BM": self.bm.copy()},
            volume_id=self.name,
            bscan_order="inferior_first",
        )

    def truth(self) -> dict[str, object]:
        """JSON-ready description of the truth (arrays excluded)."""
        return {
            "name": self.name,
            "phantom_version": PHANTOM_VERSION,
            "seed": self.seed,
            "shape": list(self.data.shape),
            "spacing_mm": list(self.spacing_mm),
            "laterality": self.laterality,
            "bscan_order": "inferior_first",
            "intensity": "linear",
            "fovea_mm": list(self.fovea_mm),
            "diseased": self.diseased,
            "lesion_types": list(self.lesion_types),
            "lesion_labels": LESION_LABELS,
            "lesions": [dict(lesion) for lesion in self.lesions],
            "surfaces": list(SURFACES),
            "row_convention": "pixel r covers rows [r-0.5, r+0.5)",
        }


def _thickness_um(r_mm: np.ndarray, nasal_mm: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
    """Thickness of each band between consecutive surfaces (ILM..BM), in µm."""
    pit_r = rng.uniform(0.38, 0.55)
    pit = 1.0 - np.exp(-((r_mm / pit_r) ** 2))  # 0 in the foveal pit, ~1 beyond 1 mm
    ring = lambda c, w: np.exp(-(((r_mm - c) / w) ** 2))  # noqa: E731
    fovea = np.exp(-((r_mm / 0.45) ** 2))
    nasal = 1.0 / (1.0 + np.exp(-nasal_mm / 0.6))
    s = rng.uniform(0.92, 1.08)  # per-eye scale
    nfl = pit * (6 + 22 * (1 - np.exp(-((r_mm / 2.0) ** 2)))) * (0.8 + 0.9 * nasal)
    gcl = pit * (16 + 46 * ring(1.05, 0.75))
    ipl = 3 + pit * (24 + 14 * ring(1.1, 0.9))
    inl = 2 + pit * (24 + 16 * ring(1.0, 0.8))
    opl = 12 + 16 * pit
    onl = 62 + 50 * np.exp(-((r_mm / 0.55) ** 2))
    elm = np.full_like(r_mm, 4.0)
    myoid = 19 + 6 * fovea
    ez = np.full_like(r_mm, 10.0)
    os_ = 14 + 14 * fovea
    iz = np.full_like(r_mm, 8.0)
    rpe = np.full_like(r_mm, 22.0)
    bm = np.full_like(r_mm, 6.0)
    bands = [nfl, gcl, ipl, inl, opl, onl, elm, myoid, ez, os_, iz, rpe, bm]
    return [b * s for b in bands]


def _vessel_paths(rng: np.random.Generator, nasal_sign: float, half_extent_mm: tuple[float, float],
                  fovea: tuple[float, float]) -> list[tuple[np.ndarray, float]]:
    """Retinal vessel centre lines in the en-face plane as (points (n, 2) in (z, x) mm, width mm).

    Vessels leave the disc (nasal, outside the scan) and arch above and below the fovea,
    the way the temporal arcades do.
    """
    paths = []
    n = int(rng.integers(4, 9))
    hz, hx = half_extent_mm
    disc_x = fovea[1] + nasal_sign * rng.uniform(3.5, 4.5)
    for _ in range(n):
        side = rng.choice([-1.0, 1.0])
        reach = rng.uniform(0.6, 2.8)  # how far from the fovea the arcade passes
        width = rng.uniform(0.05, 0.13)
        x = np.linspace(-hx - 1.0, hx + 1.0, 400)
        t = (x - disc_x) / (fovea[1] - disc_x)  # 0 at the disc, 1 at the fovea
        z = fovea[0] + side * (reach * np.sin(np.clip(t, 0, 1.6) * np.pi / 1.6) + rng.uniform(0.1, 0.5) * t)
        z = z + rng.normal(0, 0.05) * np.sin(x * rng.uniform(1.0, 3.0))
        paths.append((np.stack([z, x], axis=1), width))
    return paths


def _distance_to_path(points: np.ndarray, zz: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """Distance (mm) of each grid point (zz, xx) to a polyline given by dense points."""
    grid = np.stack([zz.ravel(), xx.ravel()], axis=1)
    best = np.full(grid.shape[0], np.inf)
    for chunk in np.array_split(points, max(1, len(points) // 50)):
        d = np.sqrt(((grid[:, None, :] - chunk[None, :, :]) ** 2).sum(-1)).min(1)
        best = np.minimum(best, d)
    return best.reshape(zz.shape)


def _footprint(zz: np.ndarray, xx: np.ndarray, centre: tuple[float, float], radius: float,
               power: float, rng: np.random.Generator) -> np.ndarray:
    """A dome profile in [0, 1] over the en-face grid, elliptical with random orientation."""
    angle = rng.uniform(0, np.pi)
    aspect = rng.uniform(0.7, 1.3)
    dz, dx = zz - centre[0], xx - centre[1]
    u = (np.cos(angle) * dx + np.sin(angle) * dz) / (radius * aspect)
    v = (-np.sin(angle) * dx + np.cos(angle) * dz) / (radius / aspect)
    q = np.clip(1.0 - (u * u + v * v), 0.0, None)
    return q**power


def make_phantom(
    rng: np.random.Generator,
    *,
    shape: tuple[int, int, int] = DEFAULT_SHAPE,
    spacing_mm: tuple[float, float, float] = DEFAULT_SPACING_MM,
    lesions: Sequence[LesionSpec] = (),
    laterality: str | None = None,
    vessels: bool = True,
    speckle: bool = True,
    name: str = "phantom",
    seed: int | None = None,
) -> Phantom:
    """Make one synthetic Spectralis-like volume with known boundaries and lesions.

    Parameters
    ----------
    rng : numpy.random.Generator
        Source of every random choice; the same generator state gives the same phantom.
    shape : (int, int, int)
        (n_bscans, n_axial, n_ascans). Default 49 × 496 × 512.
    spacing_mm : (float, float, float)
        (between B-scans, axial, lateral) in mm. Default (0.12, 0.00387, 0.0113).
    lesions : sequence of LesionSpec
        Which lesions, how many and how large. Empty gives a healthy eye.
    laterality : {"OD", "OS"}, optional
        Drawn at random when not given.
    vessels, speckle : bool
        Render retinal vessels (with shadows) and speckle. Off gives a clean image.
    name : str
        Pseudonymous name carried into the truth.
    seed : int, optional
        Recorded in the truth only.

    Returns
    -------
    Phantom

    Raises
    ------
    ValueError
        If the shape, spacing or laterality is invalid, or the axial field is too short
        to hold a retina and choroid.
    """
    if not isinstance(rng, np.random.Generator):
        raise ValueError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"shape must be 3 positive ints (n_bscans, n_axial, n_ascans), got {shape}")
    if len(spacing_mm) != 3 or min(spacing_mm) <= 0:
        raise ValueError(f"spacing_mm must be 3 positive values in mm, got {spacing_mm}")
    if laterality not in (None, "OD", "OS"):
        raise ValueError(f"laterality must be 'OD', 'OS' or None, got {laterality!r}")
    nz, ny, nx = (int(v) for v in shape)
    dz, dy, dx = (float(v) for v in spacing_mm)
    depth_mm = ny * dy
    if depth_mm < 0.9:
        raise ValueError(f"axial field {depth_mm:.2f} mm (n_axial × spacing) is too short; need >= 0.9 mm")
    um_to_px = 1e-3 / dy
    if laterality is None:
        laterality = "OD" if rng.random() < 0.5 else "OS"
    nasal_sign = 1.0 if laterality == "OD" else -1.0  # OD: nasal (disc) to the right of the B-scan

    # En-face grid, mm from the volume centre.
    z_mm = (np.arange(nz) - (nz - 1) / 2) * dz
    x_mm = (np.arange(nx) - (nx - 1) / 2) * dx
    zz, xx = np.meshgrid(z_mm, x_mm, indexing="ij")
    half = (max(nz * dz / 2, 1e-6), nx * dx / 2)
    fovea = (
        float(np.clip(rng.normal(0, 0.25), -0.6, 0.6)) if nz > 1 else 0.0,
        float(np.clip(rng.normal(0, 0.25), -0.6, 0.6)),
    )
    r_mm = np.hypot(zz - fovea[0], xx - fovea[1])
    nasal_mm = nasal_sign * (xx - fovea[1])

    # --- anatomy: thickness in px, stacked upward from BM ---
    bands_px = [t * um_to_px for t in _thickness_um(r_mm, nasal_mm, rng)]
    curv = rng.uniform(6.0, 18.0) * um_to_px  # µm per mm^2: the globe seen from inside is U-shaped
    tilt_x = rng.normal(0, 12.0) * um_to_px  # µm per mm
    tilt_z = rng.normal(0, 12.0) * um_to_px
    shape_px = -curv * (zz**2 + xx**2) + tilt_x * xx + tilt_z * zz
    retina_px = np.sum(bands_px, axis=0)
    choroid_px = rng.uniform(200, 330) * um_to_px * (1 - 0.15 * np.tanh(r_mm))
    # Place BM so that the retina and the upper choroid fit in the field.
    top_margin = max(8.0, 0.04 * ny)
    bottom_margin = min(0.35 * ny, 150 * um_to_px)
    bm_lo = top_margin + (retina_px - shape_px).max()
    bm_hi = ny - bottom_margin - shape_px.max()
    lesion_room = 120 * um_to_px if lesions else 0.0
    bm_lo += lesion_room
    if bm_hi <= bm_lo:
        bm_centre = (bm_lo + bm_hi) / 2
    else:
        bm_centre = rng.uniform(bm_lo, bm_lo + 0.35 * (bm_hi - bm_lo))
    bm_row = bm_centre + shape_px

    n_surf = len(SURFACES)
    surfaces = np.empty((n_surf, nz, nx), dtype=np.float64)
    surfaces[_S["BM"]] = bm_row
    surfaces[_S["CHOROID/SCLERA"]] = bm_row + choroid_px
    # walk upward from BM: surface k = surface k+1 - thickness of band k (band k lies under surface k)
    for k in range(_S["BM"] - 1, -1, -1):
        surfaces[k] = surfaces[k + 1] - bands_px[k]

    # --- lesions: open space at an anatomical level, lift everything above ---
    overlays: list[tuple[np.ndarray, np.ndarray, float, int]] = []  # (top, bottom, level, label) per (z, x)
    lesion_records: list[dict[str, object]] = []
    plans = []
    for spec in lesions:
        (c_lo, c_hi), (r_lo, r_hi), (h_lo, h_hi) = spec.resolved()
        for _ in range(int(rng.integers(c_lo, c_hi + 1))):
            plans.append((spec.kind, float(rng.uniform(r_lo, r_hi)), float(rng.uniform(h_lo, h_hi))))
    # deepest level first, so shallower lesions lift the surfaces already lifted
    depth_order = {"ped": 0, "drusen": 0, "srf": 1, "irf": 2, "hrf": 3}
    plans.sort(key=lambda p: depth_order[p[0]])
    for kind, radius, height_um in plans:
        centre = _lesion_centre(kind, rng, fovea, half, radius)
        if radius < dz:  # smaller than the B-scan gap: put it on the nearest B-scan, or no B-scan sees it
            centre = (float(z_mm[np.argmin(np.abs(z_mm - centre[0]))]), centre[1])
        height_px = height_um * um_to_px
        if kind == "hrf":
            prof = _footprint(zz, xx, centre, max(radius, 0.75 * dx), 0.5, rng)
            # a focus sits at one depth inside the inner nuclear / outer plexiform / outer nuclear layers
            k = int(rng.choice([_S["IPL/INL"], _S["INL/OPL"], _S["OPL/ONL"]]))
            frac = rng.uniform(0.2, 0.8)
            mid = surfaces[k] + frac * (surfaces[k + 1] - surfaces[k])
            half_h = 0.5 * height_px * np.sqrt(prof)
            top, bottom = mid - half_h, mid + half_h
        else:
            if kind == "irf":
                prof = _footprint(zz, xx, centre, radius, 0.5, rng)
                k = int(rng.choice([_S["IPL/INL"], _S["OPL/ONL"]]))  # cyst inside INL or ONL
                frac = rng.uniform(0.3, 0.7)
                push = rng.uniform(0.6, 0.9)
            else:
                power = {"srf": 1.2, "ped": 0.6, "drusen": 0.8}[kind]
                prof = _footprint(zz, xx, centre, radius, power, rng)
                k = _S["IZ"] - 1 if kind == "srf" else _S["RPE/BM"] - 1
                frac, push = 1.0, 1.0
            e = height_px * prof
            split = surfaces[k] + frac * (surfaces[k + 1] - surfaces[k])
            e_up, e_down = push * e, (1.0 - push) * e
            if kind == "irf":  # keep the cyst above the photoreceptors
                e_down = np.minimum(e_down, np.maximum(surfaces[_S["ELM"]] - split - 1.0, 0.0))
            surfaces[: k + 1] -= e_up
            top, bottom = split - e_up, split + e_down
        if not np.any(bottom - top > 0.5):
            continue  # too small to show at this sampling
        overlays.append((top, bottom, _LESION_LEVEL[kind], LESION_LABELS[kind]))
        lesion_records.append({
            "kind": kind, "label": LESION_LABELS[kind],
            "centre_mm": [round(centre[0], 4), round(centre[1], 4)],
            "radius_mm": round(radius, 4), "height_um": round(height_um, 1),
        })
    # lifting may push the top out of the field: shift the whole eye down if needed
    lift = top_margin - surfaces[0].min()
    if lift > 0:
        surfaces += lift
        overlays = [(t + lift, b + lift, lv, lb) for t, b, lv, lb in overlays]

    vessels_list = _vessel_paths(rng, nasal_sign, half, fovea) if vessels else []
    vessel_dist = [(_distance_to_path(p, zz, xx), w) for p, w in vessels_list]
    choroid_field = _choroid_texture(rng, nz, ny, nx, dy, dx)

    rows = np.arange(ny, dtype=np.float64)[:, None]
    data = np.empty((nz, ny, nx), dtype=np.float32)
    mask = np.zeros((nz, ny, nx), dtype=np.uint8)
    levels = display_to_linear(_LEVELS).astype(np.float64)
    for i in range(nz):
        s = surfaces[:, i, :]
        img = np.full((ny, nx), levels[0])
        for k in range(n_surf):
            cover = np.clip(rows + 0.5 - s[k][None, :], 0.0, 1.0)
            img += (levels[k + 1] - levels[k]) * cover
        # choroid: texture and fall-off with depth below BM
        below_bm = rows - s[_S["BM"]][None, :]
        chor = np.clip(below_bm, 0, None)
        fall = np.exp(-chor / (62 * um_to_px))
        texture = choroid_field[i] if choroid_field is not None else 1.0
        chor_lin = display_to_linear(np.full(1, _CHOROID_LEVEL))[0] * texture * fall
        deep = np.exp(-np.clip(rows - s[_S["CHOROID/SCLERA"]][None, :], 0, None) / (60 * um_to_px))
        choroid_part = np.clip(below_bm, 0.0, 1.0) * chor_lin * deep
        img = np.where(below_bm > 0, img + choroid_part, img)
        # lesions
        for top, bottom, level, label in overlays:
            t, b = top[i][None, :], bottom[i][None, :]
            cover = np.clip(np.minimum(rows + 0.5, b) - np.maximum(rows - 0.5, t), 0.0, 1.0)
            if not cover.any():
                continue
            img = img * (1 - cover) + display_to_linear(np.full(1, level))[0] * cover
            mask[i][cover >= 0.5] = label
        # retinal vessels: bright lumen wall in the inner retina and a shadow beneath
        for dist, width in vessel_dist:
            near = np.exp(-((dist[i] / (width / 2)) ** 4))
            if near.max() < 1e-3:
                continue
            v_row = s[_S["NFL/GCL"]] + 0.3 * (s[_S["GCL/IPL"]] - s[_S["NFL/GCL"]])
            v_half = 0.5 * width * 1e3 * um_to_px * 0.6
            in_vessel = np.exp(-(((rows - v_row[None, :]) / np.maximum(v_half, 1.0)) ** 2)) * near[None, :]
            shadow = 1.0 - 0.65 * near[None, :] * np.clip((rows - v_row[None, :]) / max(v_half, 1.0), 0, 1)
            img = img * shadow + levels[2] * 0.8 * in_vessel
        data[i] = img
    # optical blur (axial and lateral resolution about 7 µm and 14 µm)
    sigma = (0.0, 3.0 * um_to_px, 6.0e-3 / dx)  # FWHM / 2.355
    data = ndi.gaussian_filter(data, sigma=sigma, mode="nearest").astype(np.float32)
    if speckle:
        data *= _speckle(rng, (nz, ny, nx))
    data *= np.float32(rng.uniform(0.85, 1.15))  # per-volume signal strength
    np.clip(data, 0.0, 1.0, out=data)  # the device saturates at 1, as in the real .vol files
    return Phantom(
        data=data.astype(np.float32),
        surfaces=surfaces.astype(np.float32),
        lesion_mask=mask,
        lesions=tuple(lesion_records),
        spacing_mm=(dz, dy, dx),
        laterality=laterality,
        fovea_mm=fovea,
        name=name,
        seed=seed,
    )


def _lesion_centre(kind: str, rng: np.random.Generator, fovea: tuple[float, float],
                   half: tuple[float, float], radius: float) -> tuple[float, float]:
    """Where a lesion sits: fluid near the fovea, drusen and foci spread over the macula."""
    spread = {"srf": 0.4, "ped": 0.6, "irf": 0.9, "drusen": 1.4, "hrf": 1.3}[kind]
    z = fovea[0] + rng.normal(0, spread)
    x = fovea[1] + rng.normal(0, spread)
    z = float(np.clip(z, -half[0] + 0.5 * radius, half[0] - 0.5 * radius)) if half[0] > radius else fovea[0]
    x = float(np.clip(x, -half[1] + 0.5 * radius, half[1] - 0.5 * radius))
    return z, x


def _choroid_texture(rng: np.random.Generator, nz: int, ny: int, nx: int, dy: float, dx: float) -> np.ndarray:
    """Multiplicative choroid texture: bright stroma with dark vessel lumens of 40-150 µm."""
    sigma = (0.0, 0.016 / dy, 0.045 / dx)
    noise = ndi.gaussian_filter(rng.standard_normal((nz, ny, nx)).astype(np.float32), sigma=sigma)
    noise /= noise.std() + 1e-12
    lumen = 1.0 / (1.0 + np.exp(-(noise - 0.3) * 4.0))  # soft threshold
    return (1.35 - 1.15 * lumen).astype(np.float32)


def _speckle(rng: np.random.Generator, shape: tuple[int, int, int]) -> np.ndarray:
    """Correlated multiplicative speckle, normalised to a geometric mean of 1.

    Fully developed speckle intensity is exponential; Spectralis averages frames (ART)
    and the optics correlate neighbours. An exponential field smoothed over about
    (1.06, 0.75) px gives the lag-1 correlations (axial 0.8, lateral 0.64) and the
    log-domain spread measured on the real files.
    """
    white = rng.standard_exponential(shape, dtype=np.float32)
    field = ndi.gaussian_filter(white, sigma=(0.0, 1.06, 0.75), mode="wrap")
    field = np.maximum(field, 1e-6)
    field = np.exp(1.2 * (np.log(field) - np.log(field).mean()))  # ART averaging leaves this spread
    return field.astype(np.float32)


def make_cohort(
    n: int,
    *,
    seed: int = 0,
    lesions: Sequence[LesionSpec] = (),
    healthy_fraction: float = 0.5,
    shape: tuple[int, int, int] = DEFAULT_SHAPE,
    spacing_mm: tuple[float, float, float] = DEFAULT_SPACING_MM,
    prefix: str = "phantom",
):
    """Yield ``n`` phantoms; the first ``round(n * healthy_fraction)`` are healthy.

    Each phantom has its own generator spawned from ``seed``, so phantom ``k`` is the
    same whatever ``n`` is, and cohorts are reproducible.

    Parameters
    ----------
    n : int
        Number of phantoms.
    seed : int
        Cohort seed.
    lesions : sequence of LesionSpec
        Lesions for the diseased phantoms. Empty makes every phantom healthy.
    healthy_fraction : float
        Fraction of healthy phantoms, in [0, 1].
    shape, spacing_mm : tuple
        Passed to :func:`make_phantom`.
    prefix : str
        Phantom names are ``f"{prefix}-{k:04d}"``.

    Yields
    ------
    Phantom
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if not 0.0 <= healthy_fraction <= 1.0:
        raise ValueError(f"healthy_fraction must be in [0, 1], got {healthy_fraction}")
    n_healthy = round(n * healthy_fraction) if lesions else n
    children = np.random.SeedSequence(seed).spawn(n)
    for k, child in enumerate(children):
        rng = np.random.default_rng(child)
        yield make_phantom(
            rng,
            shape=shape,
            spacing_mm=spacing_mm,
            lesions=() if k < n_healthy else lesions,
            name=f"{prefix}-{k:04d}",
            seed=seed,
        )
