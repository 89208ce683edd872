"""Read Heidelberg Spectralis raw-export ``.vol`` files (HSF-OCT-103).

File layout (all little-endian)::

    file header                 2048 bytes          (_FILE_HEADER_FIELDS)
    SLO image                   SizeYSlo x SizeXSlo uint8
    NumBScans times:
        B-scan header           BScanHdrSize bytes  (_BSCAN_HEADER_FIELDS, 256 bytes,
                                                     then NumSeg x SizeX float32 boundary
                                                     rows at OffSeg, then zero padding)
        B-scan pixels           SizeZ x SizeX float32 (axial rows x A-scans), linear
    optional trailer            (e.g. thickness grid; ignored)

Pixels and boundary values >= 3e38 (FLT_MAX) mark "no data". The header tables
below are used both to parse and to build the headers (:mod:`octpipe.io.writers.heyex_vol`).
Fields flagged ``identifying`` (patient and visit identifiers, dates, device ids) are never
returned by the parser, so they cannot reach an :class:`~octpipe.volume.OctVolume`.
"""

from __future__ import annotations

import hashlib
import math
import os
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import numpy.typing as npt

from octpipe.errors import CorruptFileError, FormatError
from octpipe.io._binary import Field as _Field
from octpipe.io._binary import struct_for, unpack
from octpipe.io._common import make_provenance
from octpipe.io._heyex import HEYEX_LAYER_NAMES, INVALID_FROM
from octpipe.volume import OctVolume

__all__ = ["read_heyex_vol", "read_heyex_vol_slo", "HEYEX_LAYER_NAMES"]

# HSF-OCT-103 file header, 2048 bytes. Field meanings after the Heidelberg
# "Spectralis raw export" description (as documented in eyepy's vol_reader).
_FILE_HEADER_FIELDS: tuple[_Field, ...] = (
    _Field("Version", "12s", "magic and version, e.g. 'HSF-OCT-103', zero terminated"),
    _Field("SizeX", "I", "A-scans per B-scan (B-scan width, px)"),
    _Field("NumBScans", "I", "number of B-scans"),
    _Field("SizeZ", "I", "samples per A-scan (B-scan height, px)"),
    _Field("ScaleX", "d", "lateral pixel width in mm"),
    _Field("Distance", "d", "distance between adjacent B-scans in mm"),
    _Field("ScaleZ", "d", "axial pixel height in mm"),
    _Field("SizeXSlo", "I", "SLO image width in px"),
    _Field("SizeYSlo", "I", "SLO image height in px"),
    _Field("ScaleXSlo", "d", "SLO pixel width in mm"),
    _Field("ScaleYSlo", "d", "SLO pixel height in mm"),
    _Field("FieldSizeSlo", "I", "horizontal SLO field size in degrees"),
    _Field("ScanFocus", "d", "scan focus in dioptres"),
    _Field("ScanPosition", "4s", "examined eye, 'OD' or 'OS', zero terminated"),
    _Field("ExamTime", "Q", "exam time, 100 ns units since 1601-01-01", identifying=True),
    _Field("ScanPattern", "i", "0 unknown, 1 line, 2 circle, 3 volume (ART), 4 fast volume, 5 radial"),
    _Field("BScanHdrSize", "I", "size of the header preceding each B-scan, bytes"),
    _Field("ID", "16s", "scan id (series number), zero terminated", identifying=True),
    _Field("ReferenceID", "16s", "id of the progression reference scan", identifying=True),
    _Field("PID", "I", "internal Heyex patient id", identifying=True),
    _Field("PatientID", "24s", "user-defined patient id, zero terminated", identifying=True),
    _Field("DOB", "d", "date of birth, days since 1899-12-30", identifying=True),
    _Field("VID", "I", "internal Heyex visit id", identifying=True),
    _Field("VisitID", "24s", "user-defined visit id, zero terminated", identifying=True),
    _Field("VisitDate", "d", "visit date, days since 1899-12-30", identifying=True),
    _Field("GridType", "I", "type of thickness grid, 0 = none"),
    _Field("GridOffset", "I", "file offset of the thickness grid, 0 = none"),
    _Field("GridType1", "I", "type of a second thickness grid"),
    _Field("GridOffset1", "I", "file offset of the second thickness grid"),
    _Field("ProgID", "34s", "internal progression id, zero terminated", identifying=True),
    _Field("Spare", "1790x", "spare, zero"),
)

# HSF-BS-103 B-scan header: the first 256 bytes of each BScanHdrSize block.
_BSCAN_HEADER_FIELDS: tuple[_Field, ...] = (
    _Field("Version", "12s", "magic and version, e.g. 'HSF-BS-103', zero terminated"),
    _Field("BScanHdrSize", "I", "size of this header block in bytes (same as the file header's)"),
    _Field("StartX", "d", "x of the B-scan start point on the SLO, mm"),
    _Field("StartY", "d", "y of the B-scan start point on the SLO, mm (y grows downwards)"),
    _Field("EndX", "d", "x of the B-scan end point, mm; circle centre for circle scans"),
    _Field("EndY", "d", "y of the B-scan end point, mm; circle centre for circle scans"),
    _Field("NumSeg", "I", "number of boundary rows stored at OffSeg"),
    _Field("OffSeg", "I", "offset of the boundary rows from the start of this header, bytes"),
    _Field("Quality", "f", "image quality; FLT_MAX when not available"),
    _Field("Shift", "i", "horizontal shift (A-scans) of the classification band (circle scans)"),
    _Field("IVTrafo", "6f", "intra-volume transformation (volume/radial scans without alignment)"),
    _Field("Spare", "168x", "spare, zero"),
)

_SCAN_PATTERNS = {0: "unknown", 1: "line", 2: "circle", 3: "volume", 4: "volume", 5: "radial"}

_FILE_MAGIC = b"HSF-OCT-"
_BSCAN_MAGIC = b"HSF-BS-"
_FILE_HEADER_SIZE = 2048
_BSCAN_FIXED_SIZE = 256
_MAX_SIZE = 8192
_MAX_BSCANS = 4096
_MAX_BSCAN_HDR_SIZE = _BSCAN_FIXED_SIZE + 64 * 4 * _MAX_SIZE


_FILE_STRUCT = struct_for(_FILE_HEADER_FIELDS)
_BSCAN_STRUCT = struct_for(_BSCAN_HEADER_FIELDS)
if _FILE_STRUCT.size != _FILE_HEADER_SIZE or _BSCAN_STRUCT.size != _BSCAN_FIXED_SIZE:  # pragma: no cover
    raise RuntimeError("heyex_vol header tables do not add up to 2048 / 256 bytes")


# --------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class _Layout:
    """Validated geometry of a .vol file (header values needed to read it)."""

    header: dict[str, object]
    size_x: int
    size_z: int
    n_bscans: int
    slo_shape: tuple[int, int]
    bscan_hdr_size: int
    file_size: int

    @property
    def slo_bytes(self) -> int:
        return self.slo_shape[0] * self.slo_shape[1]

    @property
    def bscan_bytes(self) -> int:
        return self.size_z * self.size_x * 4

    @property
    def expected_size(self) -> int:
        return _FILE_HEADER_SIZE + self.slo_bytes + self.n_bscans * (self.bscan_hdr_size + self.bscan_bytes)


class _HashingReader:
    """Read exact byte counts from a file while hashing every byte read."""

    def __init__(self, fh: BinaryIO, path: Path, file_size: int) -> None:
        self._fh = fh
        self._path = path
        self._file_size = file_size
        self.digest = hashlib.sha256()

    def read(self, n: int, what: str) -> bytes:
        start = self._fh.tell()
        buf = self._fh.read(n)
        self.digest.update(buf)
        if len(buf) != n:
            raise CorruptFileError(
                f"truncated in {what}: expected {start + n} bytes, file has {start + len(buf)}", self._path)
        return buf

    def read_upto(self, n: int) -> bytes:
        """Read at most ``n`` bytes (a short result is not an error here)."""
        buf = self._fh.read(n)
        self.digest.update(buf)
        return buf

    def read_rest(self) -> int:
        """Hash the remaining bytes; return how many there were."""
        count = 0
        for block in iter(lambda: self._fh.read(1 << 20), b""):
            self.digest.update(block)
            count += len(block)
        return count


def _check_range(value: object, low: int, high: int, name: str, path: Path) -> int:
    if not isinstance(value, int) or not low <= value <= high:
        raise CorruptFileError(f"implausible {name} {value} (valid {low}..{high})", path)
    return value


def _read_layout(reader: _HashingReader, path: Path, file_size: int) -> _Layout:
    """Read and validate the file header; check the file is long enough."""
    head = reader.read_upto(_FILE_HEADER_SIZE)
    if not head.startswith(_FILE_MAGIC):
        raise FormatError(f"not a Heidelberg .vol file (magic {head[:8]!r}, expected {_FILE_MAGIC!r})", path)
    if len(head) < _FILE_HEADER_SIZE:
        raise CorruptFileError(
            f"truncated: expected at least {_FILE_HEADER_SIZE} bytes (file header), file has {len(head)}", path)
    try:
        header = unpack(_FILE_HEADER_FIELDS, _FILE_STRUCT, head)
    except (struct.error, UnicodeError) as exc:  # pragma: no cover - length checked above
        raise CorruptFileError(f"unreadable file header ({exc})", path) from exc
    size_x = _check_range(header["SizeX"], 1, _MAX_SIZE, "SizeX", path)
    size_z = _check_range(header["SizeZ"], 1, _MAX_SIZE, "SizeZ", path)
    n_bscans = _check_range(header["NumBScans"], 1, _MAX_BSCANS, "NumBScans", path)
    slo_x = _check_range(header["SizeXSlo"], 0, _MAX_SIZE, "SizeXSlo", path)
    slo_y = _check_range(header["SizeYSlo"], 0, _MAX_SIZE, "SizeYSlo", path)
    hdr_size = _check_range(header["BScanHdrSize"], _BSCAN_FIXED_SIZE, _MAX_BSCAN_HDR_SIZE, "BScanHdrSize", path)
    for name in ("ScaleX", "ScaleZ", "Distance"):
        value = header[name]
        if not (isinstance(value, float) and math.isfinite(value) and 0.0 <= value < 1e3):
            raise CorruptFileError(f"implausible {name} {value} mm (valid 0..1000)", path)
    layout = _Layout(header=header, size_x=size_x, size_z=size_z, n_bscans=n_bscans,
                     slo_shape=(slo_y, slo_x), bscan_hdr_size=hdr_size, file_size=file_size)
    if file_size < layout.expected_size:
        raise CorruptFileError(f"truncated: expected {layout.expected_size} bytes, file has {file_size}", path)
    return layout


def _invalid_mask(values: npt.NDArray[np.float32]) -> npt.NDArray[np.bool_]:
    """Return True where a stored float is FLT_MAX-like or not finite."""
    mask = ~np.isfinite(values)
    mask |= values >= INVALID_FROM
    return mask


def _parse_bscan_header(buf: bytes, index: int, layout: _Layout, path: Path) -> dict[str, object]:
    try:
        header = unpack(_BSCAN_HEADER_FIELDS, _BSCAN_STRUCT, buf)
    except (struct.error, UnicodeError) as exc:  # pragma: no cover - length checked by caller
        raise CorruptFileError(f"unreadable header of B-scan {index} ({exc})", path) from exc
    if not buf.startswith(_BSCAN_MAGIC):
        raise CorruptFileError(f"B-scan {index} header has magic {buf[:7]!r}, expected {_BSCAN_MAGIC!r}", path)
    if header["BScanHdrSize"] != layout.bscan_hdr_size:
        raise CorruptFileError(
            f"B-scan {index} header size {header['BScanHdrSize']} != file BScanHdrSize {layout.bscan_hdr_size}", path)
    off_seg = int(header["OffSeg"]) or _BSCAN_FIXED_SIZE  # type: ignore[call-overload]
    num_seg = int(header["NumSeg"])  # type: ignore[call-overload]
    if off_seg < _BSCAN_FIXED_SIZE or off_seg + num_seg * layout.size_x * 4 > layout.bscan_hdr_size:
        raise CorruptFileError(
            f"B-scan {index}: NumSeg {num_seg} at OffSeg {off_seg} does not fit in "
            f"BScanHdrSize {layout.bscan_hdr_size} (SizeX {layout.size_x})", path)
    header["OffSeg"] = off_seg
    return header


@contextmanager
def _opened(path: Path) -> Iterator[tuple[_HashingReader, _Layout]]:
    """Open a .vol file and read its validated header; yield the hashing reader (at the SLO) and layout."""
    try:
        fh = open(path, "rb")  # noqa: SIM115 - closed below
    except IsADirectoryError as exc:
        raise FormatError("is a folder, not a .vol file", path) from exc
    with fh:
        file_size = os.fstat(fh.fileno()).st_size
        reader = _HashingReader(fh, path, file_size)
        yield reader, _read_layout(reader, path, file_size)


def _read_all(path: Path) -> tuple[_Layout, npt.NDArray[np.float32], list[dict[str, object]],
                                   list[npt.NDArray[np.float32]], int, str]:
    """Read a .vol file: layout, raw pixels, B-scan headers, boundary rows, trailer size, sha256."""
    with _opened(path) as (reader, layout):
        reader.read(layout.slo_bytes, "SLO image")
        pixels = np.empty((layout.n_bscans, layout.size_z, layout.size_x), dtype=np.float32)
        headers: list[dict[str, object]] = []
        segs: list[npt.NDArray[np.float32]] = []
        for i in range(layout.n_bscans):
            block = reader.read(layout.bscan_hdr_size, f"header of B-scan {i}")
            header = _parse_bscan_header(block, i, layout, path)
            off, num = int(header["OffSeg"]), int(header["NumSeg"])  # type: ignore[call-overload]
            seg = np.frombuffer(block, dtype="<f4", count=num * layout.size_x, offset=off)
            segs.append(seg.reshape(num, layout.size_x).astype(np.float32))
            headers.append(header)
            raw = reader.read(layout.bscan_bytes, f"pixels of B-scan {i}")
            pixels[i] = np.frombuffer(raw, dtype="<f4").reshape(layout.size_z, layout.size_x)
        trailer = reader.read_rest()
    return layout, pixels, headers, segs, trailer, reader.digest.hexdigest()


def _layers_from_segs(segs: list[npt.NDArray[np.float32]], size_x: int) -> dict[str, npt.NDArray[np.float32]]:
    """Stack per-B-scan boundary rows into ``{name: (n_bscans, size_x)}``; invalid -> NaN."""
    n_layers = max((s.shape[0] for s in segs), default=0)
    stacked = np.full((n_layers, len(segs), size_x), np.nan, dtype=np.float32)
    for i, seg in enumerate(segs):
        rows = np.where(_invalid_mask(seg), np.float32(np.nan), seg)
        stacked[: seg.shape[0], i] = rows
    names = [HEYEX_LAYER_NAMES[k] if k < len(HEYEX_LAYER_NAMES) else f"SEG{k}" for k in range(n_layers)]
    return {name: stacked[k].copy() for k, name in enumerate(names)}


def _bscan_order(pattern: int, headers: list[dict[str, object]]) -> str:
    """Which end of the field B-scan 0 lies at, from the B-scan start points.

    SLO y grows downwards, so B-scan 0 having the largest y means inferior first
    (the Spectralis convention).
    """
    if len(headers) == 1:
        return "inferior_first"
    if pattern not in (0, 3, 4):
        return "unknown"
    first, last = float(headers[0]["StartY"]), float(headers[-1]["StartY"])  # type: ignore[arg-type]
    if first > last:
        return "inferior_first"
    if first < last:
        return "superior_first"
    return "unknown"


def _quality(value: object) -> float | None:
    q = float(value)  # type: ignore[arg-type]
    return q if math.isfinite(q) and q < INVALID_FROM else None


def read_heyex_vol(path: str | Path) -> OctVolume:
    """Read a Heidelberg Spectralis raw-export ``.vol`` file.

    Every scan pattern is read (line, circle, volume, fast volume, radial).
    Patient and visit identifiers, dates and device ids in the header are
    never returned.

    Parameters
    ----------
    path : str or Path
        The ``.vol`` file.

    Returns
    -------
    OctVolume
        ``data`` is float32 linear reflectivity, shape (n_bscans, SizeZ, SizeX);
        pixels stored as FLT_MAX or non-finite are 0 in ``data`` and True in
        ``invalid``. ``spacing_mm`` is (Distance, ScaleZ, ScaleX). ``layers``
        holds every stored Heyex boundary by name (``"ILM"``, ``"BM"``, ...),
        NaN where missing. ``meta`` holds the version, scan pattern code, scan
        focus, SLO field size/shape/spacing and per-B-scan quality and
        start/end points (mm on the SLO).

    Raises
    ------
    FormatError
        The file does not start with ``HSF-OCT-``.
    CorruptFileError
        A header value is implausible, the file is shorter than its header
        says, or a B-scan header is inconsistent.

    Examples
    --------
    >>> import tempfile, numpy as np
    >>> d = tempfile.mkdtemp()
    >>> from octpipe.io.writers.heyex_vol import write_heyex_vol
    >>> p = write_heyex_vol(f"{d}/a.vol", np.ones((2, 8, 4), np.float32),
    ...                     spacing_mm=(0.1, 0.004, 0.01), laterality="OD")
    >>> read_heyex_vol(p).shape
    (2, 8, 4)
    """
    path = Path(path)
    layout, pixels, headers, segs, trailer, digest = _read_all(path)
    invalid = _invalid_mask(pixels)
    pixels[invalid] = 0.0
    header = layout.header
    pattern = int(header["ScanPattern"])  # type: ignore[call-overload]
    position = str(header["ScanPosition"]).upper()
    laterality = position if position in ("OD", "OS") else None
    meta: dict[str, object] = {
        "heyex_version": header["Version"],
        "scan_pattern_code": pattern,
        "scan_focus_dpt": float(header["ScanFocus"]),  # type: ignore[arg-type]
        "field_size_slo_deg": int(header["FieldSizeSlo"]),  # type: ignore[call-overload]
        "slo_shape": layout.slo_shape,
        "slo_spacing_mm": (float(header["ScaleYSlo"]), float(header["ScaleXSlo"])),  # type: ignore[arg-type]
        "bscan_header_size": layout.bscan_hdr_size,
        "bscan_quality": [_quality(h["Quality"]) for h in headers],
        "bscan_start_mm": [(float(h["StartX"]), float(h["StartY"])) for h in headers],  # type: ignore[arg-type]
        "bscan_end_mm": [(float(h["EndX"]), float(h["EndY"])) for h in headers],  # type: ignore[arg-type]
        "bscan_shift_ascans": [int(h["Shift"]) for h in headers],  # type: ignore[call-overload]
        "trailing_bytes": trailer,
    }
    provenance, volume_id = make_provenance(path, reader="heyex_vol", format="heyex-vol", sha256=digest)
    return OctVolume(
        data=pixels,
        spacing_mm=(float(header["Distance"]), float(header["ScaleZ"]), float(header["ScaleX"])),  # type: ignore[arg-type]
        spacing_source="file",
        laterality=laterality,  # type: ignore[arg-type]
        scan_pattern=_SCAN_PATTERNS.get(pattern, "unknown"),
        vendor="heidelberg",
        intensity="linear",
        invalid=invalid,
        layers=_layers_from_segs(segs, layout.size_x),
        volume_id=volume_id,
        provenance=provenance,
        bscan_order=_bscan_order(pattern, headers),
        meta=meta,
    )


def read_heyex_vol_slo(path: str | Path) -> npt.NDArray[np.uint8]:
    """Read the infrared SLO (localizer) image of a ``.vol`` file.

    Parameters
    ----------
    path : str or Path
        The ``.vol`` file.

    Returns
    -------
    ndarray of uint8, shape (SizeYSlo, SizeXSlo)
        The SLO image, row 0 at the top (superior).

    Raises
    ------
    FormatError
        The file does not start with ``HSF-OCT-``.
    CorruptFileError
        A header value is implausible or the file is truncated.

    Examples
    --------
    >>> import tempfile, numpy as np
    >>> d = tempfile.mkdtemp()
    >>> from octpipe.io.writers.heyex_vol import write_heyex_vol
    >>> p = write_heyex_vol(f"{d}/a.vol", np.ones((1, 8, 4), np.float32),
    ...                     spacing_mm=(0.0, 0.004, 0.01), laterality="OS", scan_pattern=1)
    >>> read_heyex_vol_slo(p).shape
    (256, 256)
    """
    path = Path(path)
    with _opened(path) as (reader, layout):
        raw = reader.read(layout.slo_bytes, "SLO image")
    return np.frombuffer(raw, dtype=np.uint8).reshape(layout.slo_shape).copy()
