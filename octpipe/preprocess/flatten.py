"""Flattening to Bruch's membrane, as in the paper, with an exact inverse.

Every A-scan is resampled so that a smooth BM reference lands on a fixed row
``bm_row`` of an output area ``height`` rows tall. Where the retina (BM reference minus
ILM) is thicker than the room above ``bm_row`` (less a top margin), the A-scan is also
scaled, anchored at BM, so the ILM fits; elsewhere the scale is 1 and the flattening is
a pure shift (the paper: "thickness normalised only where it exceeds the area height").

Per A-scan the map is ``source_row = bm_ref + (out_row - bm_row) / scale`` and its inverse
``out_row = bm_row + (source_row - bm_ref) * scale``. ``bm_ref`` and ``scale`` are stored
(the ``flatmap``), so images (linear interpolation), masks (nearest) and boundaries (the
formula, exact) go back to the source geometry.

Defaults, for Spectralis axial sampling (3.87 µm): ``height`` 128 rows (495 µm, twice
the 64-row patch, so a stride-32 grid has three rows of patches), ``bm_row`` 112
(62 µm of RPE/Bruch/choriocapillaris context below BM), top margin 4 rows. That leaves
108 rows = 418 µm above BM, more than the thickest healthy macula (about 350-400 µm at
the parafoveal ring), so healthy eyes are only shifted and never rescaled; thickened
diseased retinas are compressed. Configs are in µm. The area is sampled on a fixed axial
grid, ``axial_spacing_um`` (3.87 µm by default), whatever the source's axial spacing: a
Cirrus (1.95 µm), Topcon (2.6 µm) or resized export then gives the same 128 rows of the same
µm as a Spectralis volume, which is what a model trained on one store needs. The flatmap's
``scale`` then includes the source-to-grid factor (``source µm / grid µm`` where no
compression is needed). ``axial_spacing_um=None`` keeps each volume's own sampling.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from scipy import ndimage as ndi

from octpipe.preprocess.blocks import slabs

__all__ = [
    "FlattenConfig",
    "flatten_geometry",
    "axial_factor",
    "bm_reference",
    "flatten_map",
    "flatten_image",
    "unflatten_image",
    "flatten_rows",
    "unflatten_rows",
]


@dataclass(frozen=True)
class FlattenConfig:
    """Flattening parameters in µm (converted to rows with the axial spacing).

    Parameters
    ----------
    area_height_um : float
        Height of the flattened area. Default 495.4 µm = 128 rows at 3.87 µm.
    below_bm_um : float
        Room kept below BM. Default 61.9 µm = 16 rows.
    top_margin_um : float
        Room kept above the ILM when a retina has to be scaled. Default 15.5 µm = 4 rows.
    bm_smooth_um : float
        Lateral Gaussian sigma for the BM reference (µm); drusen-scale bumps of a
        misdetected BM are smoothed away, the globe's curvature is kept. Default 100 µm.
    axial_spacing_um : float or None
        Axial sampling of the flattened area (µm per row); None = the source's own.
        Default 3.87 µm (Spectralis; 128 rows for the default area).
    """

    area_height_um: float = 495.4
    below_bm_um: float = 61.9
    top_margin_um: float = 15.5
    bm_smooth_um: float = 100.0
    axial_spacing_um: float | None = 3.87

    def __post_init__(self) -> None:
        for name in ("area_height_um", "below_bm_um", "top_margin_um", "bm_smooth_um"):
            value = getattr(self, name)
            if not np.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite value >= 0, got {value}")
        a = self.axial_spacing_um
        if a is not None and (isinstance(a, bool) or not np.isfinite(a) or a <= 0):
            raise ValueError(f"axial_spacing_um must be a finite value > 0 or None, got {a}")
        if self.below_bm_um + self.top_margin_um >= self.area_height_um:
            raise ValueError(
                f"area_height_um ({self.area_height_um}) must exceed below_bm_um + top_margin_um "
                f"({self.below_bm_um + self.top_margin_um})")

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> FlattenConfig:
        """The config ``dataclasses.asdict`` wrote; missing keys take the defaults.

        Raises
        ------
        ValueError
            An unknown key, or a value out of range.

        Examples
        --------
        >>> FlattenConfig.from_dict({"area_height_um": 400.0}).area_height_um
        400.0
        """
        from dataclasses import fields

        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown flattening setting(s): {', '.join(unknown)}")
        return cls(**{k: None if v is None else float(v) for k, v in data.items()})


def flatten_geometry(config: FlattenConfig, axial_spacing_mm: float) -> tuple[int, int, int]:
    """``(height, bm_row, top_margin)`` in rows of the flattened area for a source axial spacing.

    Examples
    --------
    >>> flatten_geometry(FlattenConfig(), 0.00387)
    (128, 112, 4)
    >>> flatten_geometry(FlattenConfig(), 0.00774)  # resampled to the 3.87 µm grid
    (128, 112, 4)
    >>> flatten_geometry(FlattenConfig(axial_spacing_um=None), 0.00774)
    (64, 56, 2)
    """
    if not axial_spacing_mm > 0:
        raise ValueError(f"axial spacing must be > 0 mm, got {axial_spacing_mm}")
    um = config.axial_spacing_um if config.axial_spacing_um is not None else axial_spacing_mm * 1e3
    height = int(round(config.area_height_um / um))
    below = int(round(config.below_bm_um / um))
    margin = int(round(config.top_margin_um / um))
    return height, height - below, margin


def bm_reference(bm: npt.ArrayLike, *, sigma_columns: float) -> npt.NDArray[np.float64]:
    """Smooth BM along the A-scans of each B-scan (NaN filled by interpolation first)."""
    rows = np.asarray(bm, dtype=np.float64)
    if rows.ndim != 2:
        raise ValueError(f"bm must be (n_bscans, n_ascans), got shape {rows.shape}")
    out = np.empty_like(rows)
    cols = np.arange(rows.shape[1])
    for i, line in enumerate(rows):
        ok = np.isfinite(line)
        if not ok.any():
            raise ValueError(f"B-scan {i} has no BM position")
        filled = np.interp(cols, cols[ok], line[ok])
        out[i] = ndi.gaussian_filter1d(filled, sigma_columns, mode="nearest") if sigma_columns > 0 else filled
    return out


def axial_factor(config: FlattenConfig, axial_spacing_mm: float) -> float:
    """Rows of the flattened area per source row without compression (source µm / grid µm).

    Examples
    --------
    >>> axial_factor(FlattenConfig(), 0.00774)
    2.0
    """
    if config.axial_spacing_um is None:
        return 1.0
    return float(axial_spacing_mm * 1e3 / config.axial_spacing_um)


def flatten_map(
    ilm: npt.ArrayLike, bm: npt.ArrayLike, *, height: int, bm_row: int, top_margin: int = 4,
    sigma_columns: float = 0.0, rows_per_source_row: float = 1.0,
) -> npt.NDArray[np.float32]:
    """The flatmap ``(2, n_bscans, n_ascans)``: BM reference row and scale per A-scan.

    Parameters
    ----------
    ilm, bm : array_like, shape (n_bscans, n_ascans)
        Boundary rows in the image to flatten.
    height, bm_row, top_margin : int
        Output area height, the row BM lands on, and the room kept above the ILM.
    sigma_columns : float
        Lateral smoothing of the BM reference, in columns.
    rows_per_source_row : float
        Output rows per source row where the retina fits (:func:`axial_factor`).

    Returns
    -------
    ndarray of float32, shape (2, n_bscans, n_ascans)
        ``[bm_ref, scale]`` with ``scale <= rows_per_source_row``.
    """
    if not 0 < bm_row < height or not 0 <= top_margin < bm_row:
        raise ValueError(f"need 0 <= top_margin < bm_row < height, got {top_margin}, {bm_row}, {height}")
    ref = bm_reference(bm, sigma_columns=sigma_columns)
    ilm = np.asarray(ilm, dtype=np.float64)
    thickness = ref - np.where(np.isfinite(ilm), ilm, ref)
    room = float(bm_row - top_margin)
    base = float(rows_per_source_row)
    if not (np.isfinite(base) and base > 0):
        raise ValueError(f"rows_per_source_row must be > 0, got {rows_per_source_row}")
    scale = np.where(thickness * base > room, room / np.maximum(thickness, 1e-9), base)
    return np.stack([ref, scale]).astype(np.float32)


def _source_rows(flatmap: np.ndarray, height: int, bm_row: int) -> np.ndarray:
    ref, scale = flatmap.astype(np.float64)
    out_rows = np.arange(height, dtype=np.float64)[None, :, None]
    return ref[:, None, :] + (out_rows - bm_row) / scale[:, None, :]


def _sample_columns(volume: np.ndarray, rows: np.ndarray, *, order: int, fill: float) -> np.ndarray:
    """Sample ``volume[z, rows[z, r, x], x]`` along each A-scan (linear or nearest)."""
    nz, ny, nx = volume.shape
    z = np.arange(nz)[:, None, None]
    x = np.arange(nx)[None, None, :]
    if order == 0:  # a pixel covers rows [r - 0.5, r + 0.5)
        inside = (rows >= -0.5) & (rows < ny - 0.5)
    else:  # interpolate between pixel centres only, never extrapolate
        inside = (rows >= -1e-9) & (rows <= ny - 1 + 1e-9)
    if order == 0:
        r = np.clip(np.floor(rows + 0.5).astype(np.int64), 0, ny - 1)
        out = volume[z, r, x]
    else:
        r = np.clip(rows, 0.0, ny - 1.0)
        r0 = np.floor(r).astype(np.int64)
        r1 = np.minimum(r0 + 1, ny - 1)
        w = r - r0
        out = volume[z, r0, x] * (1.0 - w) + volume[z, r1, x] * w
    return np.where(inside, out, fill)


def flatten_image(
    volume: npt.ArrayLike, flatmap: npt.ArrayLike, *, height: int, bm_row: int, order: int = 1,
    fill: float = -1.0,
) -> npt.NDArray:
    """Resample a volume (z, y, x) into the flattened area (z, height, x).

    ``order`` 1 interpolates linearly (images); 0 takes the nearest pixel (label masks,
    whose dtype is kept). Rows that fall outside the source get ``fill``.
    """
    v = np.asarray(volume)
    fm = np.asarray(flatmap)
    if v.ndim != 3 or fm.shape != (2, v.shape[0], v.shape[2]):
        raise ValueError(f"volume (z, y, x) and flatmap (2, z, x) do not match: {v.shape}, {fm.shape}")
    nz, ny, nx = v.shape
    out = np.empty((nz, height, nx), dtype=v.dtype if order == 0 else np.float32)
    for sl in slabs((nz, max(ny, height), nx)):  # B-scan slabs: the float64 sampling grids stay small
        rows = _source_rows(fm[:, sl], height, bm_row)
        out[sl] = _sample_columns(v[sl] if order == 0 else v[sl].astype(np.float32), rows, order=order, fill=fill)
    return out


def unflatten_image(
    flat: npt.ArrayLike, flatmap: npt.ArrayLike, *, n_axial: int, bm_row: int, order: int = 1,
    fill: float = 0.0,
) -> npt.NDArray:
    """Inverse of :func:`flatten_image`: back to (z, n_axial, x); rows outside the area get ``fill``."""
    f = np.asarray(flat)
    fm = np.asarray(flatmap).astype(np.float64)
    if f.ndim != 3 or fm.shape != (2, f.shape[0], f.shape[2]):
        raise ValueError(f"flat (z, h, x) and flatmap (2, z, x) do not match: {f.shape}, {fm.shape}")
    ref, scale = fm
    src = np.arange(n_axial, dtype=np.float64)[None, :, None]
    nz, height, nx = f.shape
    out = np.empty((nz, n_axial, nx), dtype=f.dtype if order == 0 else np.float32)
    for sl in slabs((nz, max(n_axial, height), nx)):
        rows = bm_row + (src - ref[sl, None, :]) * scale[sl, None, :]
        out[sl] = _sample_columns(f[sl] if order == 0 else f[sl].astype(np.float32), rows, order=order, fill=fill)
    return out


def flatten_rows(rows: npt.ArrayLike, flatmap: npt.ArrayLike, *, bm_row: int) -> npt.NDArray[np.float64]:
    """Boundary rows (…, z, x) in the source -> rows in the flattened area (exact)."""
    ref, scale = np.asarray(flatmap).astype(np.float64)
    return bm_row + (np.asarray(rows, dtype=np.float64) - ref) * scale


def unflatten_rows(rows: npt.ArrayLike, flatmap: npt.ArrayLike, *, bm_row: int) -> npt.NDArray[np.float64]:
    """Rows in the flattened area -> source rows (exact inverse of :func:`flatten_rows`)."""
    ref, scale = np.asarray(flatmap).astype(np.float64)
    return ref + (np.asarray(rows, dtype=np.float64) - bm_row) / scale
