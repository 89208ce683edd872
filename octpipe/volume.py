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

__all__ = ["OctVolume", "Provenance", "SPACING_SOURCES", "INTENSITY_DOMAINS", "SCAN_PATTERNS", "parse_spacing",
           "override_spacing"]

SPACING_SOURCES = ("file", "default", "estimated", "user")
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
    spacing_source : {"file", "default", "estimated", "user"}
        Where ``spacing_mm`` came from: the file's header, octpipe's default (nothing
        known), estimated from the image, or given by the user (``--spacing-mm``).
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


def parse_spacing(text: str) -> tuple[float | None, float | None, float | None]:
    """Parse a ``--spacing-mm`` value ``"Z,Y,X"`` in mm; an empty field keeps the file's value.

    Parameters
    ----------
    text : str
        Three comma-separated fields (between B-scans, axial, lateral), e.g.
        ``"0.12,0.0039,0.0113"`` or ``",0.0039,0.0113"``. Z may be 0 (single B-scans);
        Y and X must be > 0. At least one field must be given.

    Returns
    -------
    tuple of (float or None)

    Raises
    ------
    ValueError
        With a one-line reason when the text is not three fields of finite numbers in range.

    Examples
    --------
    >>> parse_spacing(",0.0039,0.0113")
    (None, 0.0039, 0.0113)
    >>> parse_spacing("0,0.004,")
    (0.0, 0.004, None)
    >>> parse_spacing("1,2")
    Traceback (most recent call last):
    ...
    ValueError: spacing must be Z,Y,X in mm (3 comma-separated fields, empty = keep the file's), got '1,2'
    """
    parts = str(text).split(",")
    if len(parts) != 3:
        raise ValueError(f"spacing must be Z,Y,X in mm (3 comma-separated fields, empty = keep the file's), "
                         f"got {text!r}")
    out: list[float | None] = []
    for name, part in zip("ZYX", parts, strict=True):
        part = part.strip()
        if not part:
            out.append(None)
            continue
        try:
            value = float(part)
        except ValueError:
            raise ValueError(f"spacing {name} must be a number in mm, got {part!r}") from None
        if not np.isfinite(value) or value < 0 or (name != "Z" and value == 0) or value > 100:
            raise ValueError(f"spacing {name} must be finite and in {'[0' if name == 'Z' else '(0'}, 100] mm, "
                             f"got {part!r}")
        out.append(value)
    if all(v is None for v in out):
        raise ValueError(f"spacing must give at least one of Z,Y,X in mm, got {text!r}")
    return out[0], out[1], out[2]


def override_spacing(vol: OctVolume, spacing: tuple[float | None, float | None, float | None] | None) -> OctVolume:
    """``vol`` with the user's spacing (None fields keep the volume's), ``spacing_source="user"``.

    Examples
    --------
    >>> v = OctVolume(np.zeros((1, 4, 4), np.float32), spacing_mm=(0.0, 0.00387, 0.0113))
    >>> w = override_spacing(v, (None, 0.005, None))
    >>> w.spacing_mm, w.spacing_source
    ((0.0, 0.005, 0.0113), 'user')
    >>> override_spacing(v, None) is v
    True
    """
    from dataclasses import replace

    if spacing is None or all(s is None for s in spacing):
        return vol
    new = tuple(float(old if s is None else s) for old, s in zip(vol.spacing_mm, spacing, strict=True))
    return replace(vol, spacing_mm=new, spacing_source="user")  # type: ignore[arg-type]
