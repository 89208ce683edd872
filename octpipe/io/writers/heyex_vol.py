"""Write Heidelberg Spectralis raw-export ``.vol`` files (HSF-OCT-103).

The headers are built from the field tables of the reader, :mod:`octpipe.io.heyex_vol`
(its docstring gives the file layout), with a synthetic SLO image and B-scan positions on
it. Identifying header fields stay zero unless a privacy test asks for real-looking values.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import numpy.typing as npt

from octpipe.io._binary import pack
from octpipe.io._common import atomic_output, check_writable
from octpipe.io._heyex import FLT_MAX, HEYEX_LAYER_NAMES
from octpipe.io.heyex_vol import (
    _BSCAN_FIXED_SIZE,
    _BSCAN_HEADER_FIELDS,
    _BSCAN_STRUCT,
    _FILE_HEADER_FIELDS,
    _FILE_STRUCT,
    _MAX_BSCANS,
    _MAX_SIZE,
    _SCAN_PATTERNS,
)

__all__ = ["write_heyex_vol"]

_FILE_VERSION = "HSF-OCT-103"
_BSCAN_VERSION = "HSF-BS-103"
_DEFAULT_BSCAN_HDR_SIZE = 55296
_SLO_FIELD_DEG = 30
_SLO_FIELD_MM = 8.64  # 30 degrees at ~0.288 mm/degree (Gullstrand eye)
_FILETIME_EPOCH = datetime(1601, 1, 1, tzinfo=UTC)


def _synthetic_slo(size: int = 256) -> npt.NDArray[np.uint8]:
    """Make a plain fundus-like image: radial falloff with a brighter disc-like spot."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) / (size - 1)
    r = np.hypot(xx - 0.5, yy - 0.5)
    img = 150.0 - 120.0 * r
    img += 60.0 * np.exp(-(((xx - 0.8) ** 2 + (yy - 0.5) ** 2) / 0.004))
    return np.clip(img, 0, 255).astype(np.uint8)


def _bscan_positions(pattern: int, n_bscans: int, length_mm: float, distance_mm: float,
                     centre: tuple[float, float]) -> list[tuple[float, float, float, float]]:
    """(StartX, StartY, EndX, EndY) in mm on the SLO for each B-scan."""
    cx, cy = centre
    half = length_mm / 2.0
    if pattern == 2:
        radius = length_mm / (2.0 * math.pi)
        return [(cx - radius, cy, cx, cy)]
    if pattern == 5:
        out = []
        for i in range(n_bscans):
            angle = math.pi * i / n_bscans
            dx, dy = half * math.cos(angle), half * math.sin(angle)
            out.append((cx - dx, cy + dy, cx + dx, cy - dy))
        return out
    # Raster (volume, fast volume, unknown) or single line: B-scan 0 lowest on
    # the SLO (largest y, inferior), later B-scans higher up.
    out = []
    for i in range(n_bscans):
        y = cy + ((n_bscans - 1) / 2.0 - i) * distance_mm
        out.append((cx - half, y, cx + half, y))
    return out


def _filetime(exam_time: datetime | None) -> int:
    if exam_time is None:
        return 0
    if exam_time.tzinfo is None:
        exam_time = exam_time.replace(tzinfo=UTC)
    return int(round((exam_time - _FILETIME_EPOCH).total_seconds() * 1e7))


def _as_rows(values: npt.ArrayLike, shape: tuple[int, ...], what: str) -> npt.NDArray[np.float32]:
    """float32 little-endian copy of ``values`` with NaN/inf -> FLT_MAX."""
    arr = np.asarray(values)
    if arr.shape != shape:
        raise ValueError(f"{what} must have shape {shape}, got {arr.shape}")
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(f"{what} must be real numbers, got dtype {arr.dtype}")
    with np.errstate(over="ignore", invalid="ignore"):  # out-of-range values become inf -> FLT_MAX
        out = arr.astype("<f4", copy=True)
    out[~np.isfinite(out)] = FLT_MAX
    return out


def _identifying_fields(values: Mapping[str, object] | None) -> dict[str, object]:
    """Checked values of the identifying header fields (privacy tests write real-looking ones)."""
    fields = {f.name: f for f in _FILE_HEADER_FIELDS if f.identifying}
    out: dict[str, object] = {}
    for name, value in (values or {}).items():
        if name not in fields or name == "PatientID":
            raise ValueError(f"identifying must name fields among {sorted(set(fields) - {'PatientID'})}, got {name!r}")
        fmt = fields[name].fmt
        out[name] = _check_text(value, int(fmt[:-1]) - 1, name) if fmt.endswith("s") else value  # type: ignore[arg-type]
    return out


def _check_text(value: str, limit: int, name: str) -> str:
    if not isinstance(value, str) or not value.isascii() or len(value) > limit:
        raise ValueError(f"{name} must be an ASCII string of at most {limit} characters, got {value!r}")
    return value


def write_heyex_vol(
    path: str | Path,
    data: npt.ArrayLike,
    *,
    spacing_mm: tuple[float, float, float],
    laterality: str,
    layers: Mapping[str, npt.ArrayLike] | None = None,
    slo: npt.ArrayLike | None = None,
    scan_pattern: int = 3,
    patient_id: str = "anonymous",
    exam_time: datetime | None = None,
    overwrite: bool = False,
    identifying: Mapping[str, object] | None = None,
) -> Path:
    """Write a Heidelberg HSF-OCT-103 ``.vol`` file.

    The file is written to a temporary file in the same folder and moved into
    place, so a failed write leaves no partial output.

    Parameters
    ----------
    path : str or Path
        Output file.
    data : array_like, shape (n_bscans, n_axial, n_ascans)
        Linear reflectivity; NaN/inf are stored as FLT_MAX (no data).
    spacing_mm : tuple of 3 floats
        (between B-scans, axial, lateral) spacing in mm; axial and lateral > 0.
    laterality : {"OD", "OS"}
        Examined eye.
    layers : mapping of str to array_like, shape (n_bscans, n_ascans), optional
        Boundary row positions by Heyex name (see :data:`HEYEX_LAYER_NAMES`);
        NaN = missing. At least the ILM and BM slots are always written.
    slo : array_like of uint8, shape (rows, cols), optional
        SLO image, taken to span a 30 degree (8.64 mm) field horizontally.
        Default: a synthetic 256 x 256 fundus-like gradient.
    scan_pattern : int
        0 unknown, 1 line, 2 circle (both need one B-scan), 3 volume,
        4 fast volume, 5 radial. B-scan start/end points are laid out on the
        SLO accordingly (raster: B-scan 0 at the bottom, i.e. inferior).
    patient_id : str
        Written as given into PatientID (at most 23 ASCII characters); pass a
        pseudonym.
    exam_time : datetime, optional
        Written into ExamTime (naive = UTC); default 0 (1601-01-01).
    overwrite : bool
        Replace an existing file.
    identifying : mapping, optional
        For privacy tests only: values of the header's identifying fields (``PID``,
        ``DOB`` as days since 1899-12-30, ``VID``, ``VisitID``, ``VisitDate``, ``ID``,
        ``ReferenceID``, ``ProgID``; strings in ASCII), so that a test can check that
        nothing octpipe writes carries them.

    Returns
    -------
    Path
        The written file.

    Raises
    ------
    ValueError
        An argument is out of range (shape, spacing, laterality, layer name,
        scan pattern, patient id).
    OctpipeError
        ``path`` exists and ``overwrite`` is false.

    Examples
    --------
    >>> import tempfile, numpy as np
    >>> d = tempfile.mkdtemp()
    >>> write_heyex_vol(f"{d}/a.vol", np.zeros((3, 16, 8)), spacing_mm=(0.12, 0.0039, 0.0118),
    ...                 laterality="OS").name
    'a.vol'
    """
    arr = np.asarray(data)
    if arr.ndim != 3:
        raise ValueError(f"data must be 3-D (n_bscans, n_axial, n_ascans), got shape {arr.shape}")
    n_bscans, size_z, size_x = arr.shape
    if not (1 <= n_bscans <= _MAX_BSCANS and 1 <= size_z <= _MAX_SIZE and 1 <= size_x <= _MAX_SIZE):
        raise ValueError(f"data shape {arr.shape} out of range (1..{_MAX_BSCANS}, 1..{_MAX_SIZE}, 1..{_MAX_SIZE})")
    pixels = _as_rows(arr, arr.shape, "data")
    if len(spacing_mm) != 3:
        raise ValueError(f"spacing_mm must be 3 values (between B-scans, axial, lateral), got {spacing_mm}")
    distance, scale_z, scale_x = (float(s) for s in spacing_mm)
    if not (math.isfinite(distance) and distance >= 0 and math.isfinite(scale_z) and scale_z > 0
            and math.isfinite(scale_x) and scale_x > 0):
        raise ValueError(f"spacing_mm must be finite with distance >= 0 and axial, lateral > 0, got {spacing_mm}")
    if laterality not in ("OD", "OS"):
        raise ValueError(f"laterality must be 'OD' or 'OS', got {laterality!r}")
    if scan_pattern not in _SCAN_PATTERNS:
        raise ValueError(f"scan_pattern must be one of {sorted(_SCAN_PATTERNS)}, got {scan_pattern!r}")
    if scan_pattern in (1, 2) and n_bscans != 1:
        raise ValueError(f"scan_pattern {scan_pattern} holds exactly one B-scan, data has {n_bscans}")
    _check_text(patient_id, 23, "patient_id")

    layers = {} if layers is None else dict(layers)
    unknown = sorted(set(layers) - set(HEYEX_LAYER_NAMES))
    if unknown:
        raise ValueError(f"unknown layer names {unknown}; valid: {list(HEYEX_LAYER_NAMES)}")
    num_seg = max([2] + [HEYEX_LAYER_NAMES.index(name) + 1 for name in layers])
    seg = np.full((num_seg, n_bscans, size_x), FLT_MAX, dtype="<f4")
    for name, rows in layers.items():
        seg[HEYEX_LAYER_NAMES.index(name)] = _as_rows(rows, (n_bscans, size_x), f"layer {name!r}")

    slo_img = _synthetic_slo() if slo is None else np.asarray(slo)
    if slo_img.ndim != 2 or slo_img.dtype != np.uint8 or not all(1 <= s <= _MAX_SIZE for s in slo_img.shape):
        raise ValueError(f"slo must be a 2-D uint8 image up to {_MAX_SIZE} px a side, "
                         f"got {slo_img.dtype} {slo_img.shape}")
    slo_rows, slo_cols = slo_img.shape
    scale_slo = _SLO_FIELD_MM / slo_cols

    need = _BSCAN_FIXED_SIZE + num_seg * size_x * 4
    hdr_size = max(_DEFAULT_BSCAN_HDR_SIZE, -(-need // 1024) * 1024)
    file_header = pack(_FILE_HEADER_FIELDS, _FILE_STRUCT, {
        "Version": _FILE_VERSION, "SizeX": size_x, "NumBScans": n_bscans, "SizeZ": size_z,
        "ScaleX": scale_x, "Distance": distance, "ScaleZ": scale_z,
        "SizeXSlo": slo_cols, "SizeYSlo": slo_rows, "ScaleXSlo": scale_slo, "ScaleYSlo": scale_slo,
        "FieldSizeSlo": _SLO_FIELD_DEG, "ScanFocus": 0.0, "ScanPosition": laterality,
        "ExamTime": _filetime(exam_time), "ScanPattern": scan_pattern, "BScanHdrSize": hdr_size,
        "PatientID": patient_id,
        **_identifying_fields(identifying),
    })
    positions = _bscan_positions(scan_pattern, n_bscans, size_x * scale_x, distance,
                                 (slo_cols * scale_slo / 2.0, slo_rows * scale_slo / 2.0))

    path = check_writable(path, overwrite=overwrite)
    with atomic_output(path) as tmp, open(tmp, "wb") as out:
        out.write(file_header)
        out.write(np.ascontiguousarray(slo_img).tobytes())
        for i, (start_x, start_y, end_x, end_y) in enumerate(positions):
            block = bytearray(hdr_size)
            block[:_BSCAN_FIXED_SIZE] = pack(_BSCAN_HEADER_FIELDS, _BSCAN_STRUCT, {
                "Version": _BSCAN_VERSION, "BScanHdrSize": hdr_size,
                "StartX": start_x, "StartY": start_y, "EndX": end_x, "EndY": end_y,
                "NumSeg": num_seg, "OffSeg": _BSCAN_FIXED_SIZE, "Quality": FLT_MAX,
            })
            block[_BSCAN_FIXED_SIZE:need] = np.ascontiguousarray(seg[:, i]).tobytes()
            out.write(block)
            out.write(pixels[i].tobytes())
    return path
