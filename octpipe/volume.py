"""The one data model every reader returns: :class:`OctVolume`.

It holds data and metadata only. Axes are fixed: ``data`` is
``(n_bscans, n_axial, n_ascans)`` = (z, y, x), and every layer is a
``(n_bscans, n_ascans)`` array of row positions (float, NaN = missing).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import numpy.typing as npt

__all__ = ["OctVolume", "Provenance", "SPACING_SOURCES", "INTENSITY_DOMAINS", "SCAN_PATTERNS"]

SPACING_SOURCES = ("file", "default", "estimated")
INTENSITY_DOMAINS = ("linear", "display")
SCAN_PATTERNS = ("volume", "line", "circle", "radial", "star", "unknown")
BSCAN_ORDERS = ("inferior_first", "superior_first", "unknown")

Laterality = Literal["OD", "OS"]


@dataclass(frozen=True)
class Provenance:
    """Where a volume came from.

    Parameters
    ----------
    path : str
        The source file (or folder) as given to the reader.
    sha256 : str
        Hex digest of the source bytes (of all files, in order, for a folder).
    reader : str
        Name of the octpipe reader that produced the volume, e.g. ``"heyex_vol"``.
    format : str
        Detected file format, e.g. ``"heyex-vol"``, ``"dicom-opt"``.
    series : int
        Index of the series inside a multi-series file (E2E), else 0.
    """

    path: str
    sha256: str
    reader: str
    format: str
    series: int = 0


@dataclass(frozen=True)
class OctVolume:
    """An OCT volume with its geometry and metadata (no behaviour).

    Parameters
    ----------
    data : ndarray of float32, shape (n_bscans, n_axial, n_ascans)
        Pixel values in the domain named by ``intensity``.
    spacing_mm : tuple of 3 floats
        (between B-scans, axial, lateral) pixel spacing in mm. For a single
        B-scan the first entry is the nominal B-scan spacing (may be 0).
    spacing_source : {"file", "default", "estimated"}
        Where ``spacing_mm`` came from.
    laterality : {"OD", "OS"} or None
        Right or left eye, or None when unknown.
    scan_pattern : str
        One of :data:`SCAN_PATTERNS`.
    vendor : str
        Device maker, e.g. ``"heidelberg"``, ``"topcon"``, ``"unknown"``.
    intensity : {"linear", "display"}
        ``"linear"``: reflectivity as the device stores it (Spectralis floats).
        ``"display"``: already mapped for viewing (8-bit exports, JPEG2000, ...).
    invalid : ndarray of bool, same shape as ``data``, or None
        True where the device marked the pixel empty (FLT_MAX) or the value was
        not finite. ``data`` holds 0 there.
    layers : dict of str to ndarray of float32, shape (n_bscans, n_ascans)
        Vendor boundaries as row positions; NaN = missing.
    volume_id : str
        Pseudonymous id (salted hash); never a patient identifier.
    provenance : Provenance or None
        Source path, hash and reader.
    bscan_order : {"inferior_first", "superior_first", "unknown"}
        Which end of the scan field B-scan 0 lies at (Spectralis: inferior).
    meta : dict
        Further non-identifying metadata (scan focus, quality, ...).
    """

    data: npt.NDArray[np.float32]
    spacing_mm: tuple[float, float, float]
    spacing_source: str = "default"
    laterality: Laterality | None = None
    scan_pattern: str = "unknown"
    vendor: str = "unknown"
    intensity: str = "display"
    invalid: npt.NDArray[np.bool_] | None = None
    layers: dict[str, npt.NDArray[np.float32]] = field(default_factory=dict)
    volume_id: str = ""
    provenance: Provenance | None = None
    bscan_order: str = "unknown"
    meta: dict[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        data = self.data
        if not isinstance(data, np.ndarray) or data.ndim != 3:
            got = getattr(data, "shape", type(data))
            raise ValueError(f"data must be a 3-D array (n_bscans, n_axial, n_ascans), got {got}")
        if data.dtype != np.float32:
            raise ValueError(f"data must be float32, got {data.dtype}")
        if min(data.shape) < 1:
            raise ValueError(f"data must not be empty, got shape {data.shape}")
        if len(self.spacing_mm) != 3 or not all(np.isfinite(s) and s >= 0 for s in self.spacing_mm):
            raise ValueError(f"spacing_mm must be 3 finite values >= 0, got {self.spacing_mm}")
        if self.spacing_source not in SPACING_SOURCES:
            raise ValueError(f"spacing_source must be one of {SPACING_SOURCES}, got {self.spacing_source!r}")
        if self.laterality not in ("OD", "OS", None):
            raise ValueError(f"laterality must be 'OD', 'OS' or None, got {self.laterality!r}")
        if self.scan_pattern not in SCAN_PATTERNS:
            raise ValueError(f"scan_pattern must be one of {SCAN_PATTERNS}, got {self.scan_pattern!r}")
        if self.intensity not in INTENSITY_DOMAINS:
            raise ValueError(f"intensity must be one of {INTENSITY_DOMAINS}, got {self.intensity!r}")
        if self.bscan_order not in BSCAN_ORDERS:
            raise ValueError(f"bscan_order must be one of {BSCAN_ORDERS}, got {self.bscan_order!r}")
        if self.invalid is not None and self.invalid.shape != data.shape:
            raise ValueError(f"invalid mask shape {self.invalid.shape} != data shape {data.shape}")
        expected = (data.shape[0], data.shape[2])
        for name, rows in self.layers.items():
            if rows.shape != expected:
                raise ValueError(f"layer {name!r} has shape {rows.shape}, expected {expected}")

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(n_bscans, n_axial, n_ascans)``."""
        return tuple(self.data.shape)  # type: ignore[return-value]
