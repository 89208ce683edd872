"""Read Heidelberg Spectralis ``.E2E`` files (the ``CMDb`` container), with an own parser.

File layout (all little-endian; positions are counted from the ``CMDb`` magic, which
sits at byte 0, or at byte 64 after an ``E2EMultipleVolumeFile`` preamble)::

    file header             36 bytes                       (_FILE_HEADER_FIELDS, 'CMDb')
    main directory          52 bytes                       (_DIRECTORY_HEADER_FIELDS, 'MDbMDir')
    then, repeated:
        directory chunk     52 bytes + num_entries x 44    (_DIRECTORY_HEADER_FIELDS, 'MDbDir',
                                                            then _DIRECTORY_ENTRY_FIELDS)
        data chunks         60-byte header + payload       (_CHUNK_HEADER_FIELDS, 'MDbData')

The main directory's ``current`` field points at the last directory chunk, and each
directory chunk's ``prev`` at the one before it (0 ends the list). Every directory
entry names the position and size of one data chunk and repeats its header fields.
A data chunk belongs to a (patient, study, series) key, a slice (-1 for series-level
data, else 2 x the B-scan number in files seen) and has a type:

=============  =====================================================================
type           payload
=============  =====================================================================
9              patient record (name, birth date, id): **never decoded by this reader**
11             series data; byte 14 is the eye, ``'R'`` or ``'L'``
10004          B-scan header (_BSCAN_META_FIELDS): size, start/end in degrees,
               ``scale_y`` (axial mm/px), scan pattern
10019          one boundary of one B-scan (_LAYER_HEADER_FIELDS, then width float32
               rows; the rows are the last ``4 * width`` bytes of the payload)
0x40000000     image (_IMAGE_HEADER_FIELDS, then pixels, row-major height x width);
               image type 0x02200201 = B-scan in "ufloat16", 0x02010201 = 8-bit localizer
=============  =====================================================================

**Directory or chunk walk.** The directory is used when it is consistent: the list of
directory chunks stays inside the file and every entry points at a ``MDbData`` header
of the size the entry states. When it is stale (anonymisers and "minimizers" rewrite
files without updating it: positions outside the file, or at bytes that are not a chunk
header), the reader walks the chunks one after the other from the first byte after the
main directory, re-synchronising on the next ``MDbD...`` magic when a chunk's size does
not lead to the next chunk. A directory that is consistent but lists chunks past the end
of the file means the file is truncated, which is an error.

**Intensity.** B-scan pixels are "ufloat16": no sign, a 6-bit exponent ``e`` (high bits)
and a 10-bit mantissa ``m`` (low bits), value ``(1 + m / 1024) * 2 ** (e - 63)``; see
:func:`decode_ufloat16`. The result is Spectralis linear reflectivity (about [0, 1]).
Values above 1.99 (codes 0xFFF6 to 0xFFFF) mark empty pixels; they are 0 in ``data``
and True in ``invalid``. eyepy 0.21 and oct-converter 0.7 read the mantissa bits in
reverse order; on the real Spectralis B-scan in the panimg test data the
straight reading gives the smooth within-octave histogram of a continuous signal, and the
reversed one makes the top mantissa bit a fair coin (the true lowest bit), so the
straight reading is used here.

**Geometry.** E2E stores the axial scale (``scale_y``) but no lateral scale. When the
B-scan header gives the scan angle, the lateral spacing is estimated as
angle x 0.2896 mm/degree / width, and the B-scan spacing from the spread of the B-scan
centres, as eyepy does; otherwise defaults are used (lateral 0.0113 mm, axial 0.0039 mm,
between B-scans 0.12 mm). ``spacing_source`` is the weakest source of the three axes
("default" < "estimated" < "file"); ``meta["spacing_sources"]`` gives each axis.
B-scan 0 is the most inferior one (``bscan_order="inferior_first"``).

**Privacy.** Patient records (type 9) are never read, and the patient/study/series
numbers of the chunk headers are used only to group chunks; none of them reaches an
:class:`~octpipe.volume.OctVolume`.
"""

from __future__ import annotations

import mmap
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache, partial
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from octpipe.errors import CorruptFileError, FormatError, OctpipeError
from octpipe.io._binary import Field as _Field
from octpipe.io._binary import struct_for, unpack
from octpipe.io._common import file_sha256, make_provenance
from octpipe.io._heyex import HEYEX_LAYER_NAMES, INVALID_FROM
from octpipe.volume import OctVolume

__all__ = [
    "read_heyex_e2e",
    "inspect_heyex_e2e",
    "count_heyex_e2e_series",
    "E2ESeriesInfo",
    "decode_ufloat16",
    "HEYEX_LAYER_NAMES",
]


_FILE_HEADER_FIELDS: tuple[_Field, ...] = (
    _Field("magic", "12s", "'CMDb', zero padded"),
    _Field("version", "I", "format version (100 in files seen)"),
    _Field("unknown", "20s", "ten uint16, mostly 0xFFFF"),
)

# Used by the main directory ('MDbMDir') and by every directory chunk ('MDbDir').
_DIRECTORY_HEADER_FIELDS: tuple[_Field, ...] = (
    _Field("magic", "12s", "'MDbMDir' (main directory) or 'MDbDir' (directory chunk), zero padded"),
    _Field("version", "I", "format version"),
    _Field("unknown", "20s", "ten uint16"),
    _Field("num_entries", "I", "number of 44-byte entries that follow (directory chunk)"),
    _Field("current", "I", "main: position of the last directory chunk; chunk: its own position"),
    _Field("prev", "I", "position of the previous directory chunk, 0 = none"),
    _Field("unknown1", "I", "unknown"),
)

# The key, slice and type of a data chunk: the tail of every directory entry and of every
# chunk header (an entry repeats the header of the chunk it lists).
_CHUNK_KEY_FIELDS: tuple[_Field, ...] = (
    _Field("patient_id", "i", "Heyex patient record number (grouping only)", identifying=True),
    _Field("study_id", "i", "study number"),
    _Field("series_id", "i", "series number"),
    _Field("slice_id", "i", "slice: -1 = series-level data, else 2 x B-scan number (files seen)"),
    _Field("ind", "H", "1 for B-scan images, 0 for localizer images"),
    _Field("unknown_after_ind", "H", "unknown"),
    _Field("type", "I", "payload type, see the module docstring"),
    _Field("unknown_after_type", "I", "unknown"),
)

_DIRECTORY_ENTRY_FIELDS: tuple[_Field, ...] = (
    _Field("pos", "I", "position of this entry"),
    _Field("start", "I", "position of the data chunk it describes; 0 (or <= pos) = empty entry"),
    _Field("size", "I", "payload size of that data chunk"),
    _Field("unknown0", "I", "unknown, 0"),
    *_CHUNK_KEY_FIELDS,
)

_CHUNK_HEADER_FIELDS: tuple[_Field, ...] = (
    _Field("magic", "12s", "'MDbData', zero padded"),
    _Field("unknown0", "I", "unknown"),
    _Field("entry_pos", "I", "position of the directory entry for this chunk"),
    _Field("pos", "I", "position of this chunk (stale in rewritten files)"),
    _Field("size", "I", "payload size in bytes (stale in rewritten files)"),
    _Field("unknown1", "I", "unknown, 0"),
    *_CHUNK_KEY_FIELDS,
)

_IMAGE_HEADER_FIELDS: tuple[_Field, ...] = (
    _Field("size", "I", "payload size (stale in rewritten files)"),
    _Field("image_type", "I", "0x02200201 B-scan ufloat16, 0x02010201 localizer uint8"),
    _Field("n_values", "I", "number of pixels (stale in rewritten files)"),
    _Field("height", "I", "rows (axial samples for a B-scan)"),
    _Field("width", "I", "columns (A-scans for a B-scan)"),
)

_BSCAN_META_FIELDS: tuple[_Field, ...] = (
    _Field("unknown0", "I", "unknown"),
    _Field("size_y", "I", "B-scan height, px"),
    _Field("size_x", "I", "B-scan width, px"),
    _Field("start_x", "f", "start of the scan line on the localizer, degrees"),
    _Field("start_y", "f", "start of the scan line, degrees"),
    _Field("end_x", "f", "end of the scan line, degrees"),
    _Field("end_y", "f", "end of the scan line, degrees"),
    _Field("zero1", "I", "0"),
    _Field("unknown1", "f", "unknown"),
    _Field("scale_y", "f", "axial pixel height, mm"),
    _Field("unknown2", "f", "unknown"),
    _Field("zero2", "I", "0"),
    _Field("unknown3", "8s", "two float32, unknown"),
    _Field("zero3", "I", "0"),
    _Field("img_size_width", "I", "A-scans that hold data (may be < size_x)"),
    _Field("n_bscans", "I", "B-scans in the series"),
    _Field("current_bscan", "I", "number of this B-scan"),
    _Field("scan_pattern", "I", "1 line, 2 circle, 3 volume, 4 fast volume, 5 radial"),
    _Field("center_x", "f", "centre of the scan line, degrees"),
    _Field("center_y", "f", "centre of the scan line, degrees"),
    _Field("unknown4", "I", "unknown"),
    _Field("acquisition_time", "Q", "acquisition time, 100 ns since 1601", identifying=True),
    _Field("num_averages", "I", "number of averaged frames"),
    _Field("quality", "f", "quality"),
)

_LAYER_HEADER_FIELDS: tuple[_Field, ...] = (
    _Field("unknown0", "I", "unknown"),
    _Field("layer_id", "I", "Heyex boundary index, see HEYEX_LAYER_NAMES"),
    _Field("unknown1", "I", "unknown"),
    _Field("width", "I", "number of float32 rows (A-scans)"),
)

_LATERALITY_FIELDS: tuple[_Field, ...] = (
    _Field("unknown", "14s", "unknown"),
    _Field("laterality", "1s", "'R' right eye, 'L' left eye"),
)


_FILE_HEADER = struct_for(_FILE_HEADER_FIELDS)
_DIRECTORY_HEADER = struct_for(_DIRECTORY_HEADER_FIELDS)
_DIRECTORY_ENTRY = struct_for(_DIRECTORY_ENTRY_FIELDS)
_CHUNK_HEADER = struct_for(_CHUNK_HEADER_FIELDS)
_IMAGE_HEADER = struct_for(_IMAGE_HEADER_FIELDS)
_BSCAN_META = struct_for(_BSCAN_META_FIELDS)
_LAYER_HEADER = struct_for(_LAYER_HEADER_FIELDS)
_LATERALITY = struct_for(_LATERALITY_FIELDS)
if (_FILE_HEADER.size, _DIRECTORY_HEADER.size, _DIRECTORY_ENTRY.size, _CHUNK_HEADER.size, _IMAGE_HEADER.size,
        _BSCAN_META.size, _LAYER_HEADER.size) != (36, 52, 44, 60, 20, 104, 16):  # pragma: no cover
    raise RuntimeError("heyex_e2e field tables do not add up to the documented sizes")


# Container records: every field, the patient number included (it groups chunks into
# series and never leaves the reader), with strings as the stored bytes.
_unpack = partial(unpack, keep_identifying=True, decode_text=False)

_MAGIC_FILE = b"CMDb"
_MAGIC_MULTI = b"E2EMultipleVolumeFile"
_MULTI_PREAMBLE = 64
_MAGIC_MAIN_DIR = b"MDbMDir\0"
_MAGIC_DIR = b"MDbDir\0"
_MAGIC_DATA = b"MDbData\0"
_MAGIC_PREFIX = b"MDbD"  # shared by 'MDbDir' and 'MDbData', used to re-synchronise
_FIRST_CHUNK = _FILE_HEADER.size + _DIRECTORY_HEADER.size  # 88

_TYPE_PATIENT = 9
_TYPE_LATERALITY = 11
_TYPE_BSCAN_META = 10004
_TYPE_LAYER = 10019
_TYPE_IMAGE = 0x40000000
_IMAGE_BSCAN = 0x02200201
_IMAGE_LOCALIZER = 0x02010201

_INVALID_ABOVE = 1.99
_MAX_DIRECTORY_CHUNKS = 1 << 20

_MM_PER_DEGREE = 0.2896  # "medium eye" retinal mm per degree of scan angle, as used by eyepy
_DEFAULT_LATERAL_MM = 0.0113
_DEFAULT_AXIAL_MM = 0.0039
_DEFAULT_BSCAN_MM = 0.12
_SCAN_PATTERNS = {1: "line", 2: "circle", 3: "volume", 4: "volume", 5: "radial"}
_LATERALITIES = {b"R": "OD", b"L": "OS"}
_SOURCE_RANK = {"default": 0, "estimated": 1, "file": 2}


# --------------------------------------------------------------------------- ufloat16


@lru_cache(maxsize=1)
def _ufloat16_table() -> npt.NDArray[np.float32]:
    codes = np.arange(1 << 16, dtype=np.uint32)
    mantissa = (codes & 0x3FF).astype(np.float64)
    exponent = (codes >> 10).astype(np.int64)
    table = np.ldexp(1.0 + mantissa / 1024.0, exponent - 63).astype(np.float32)
    table.setflags(write=False)
    return table


def decode_ufloat16(codes: npt.ArrayLike) -> npt.NDArray[np.float32]:
    """Decode Heidelberg E2E "ufloat16" pixel codes to linear reflectivity.

    A code has no sign bit, a 6-bit exponent ``e`` (bits 15-10) and a 10-bit mantissa
    ``m`` (bits 9-0); its value is ``(1 + m / 1024) * 2 ** (e - 63)``. Code 0 is
    ``2 ** -63`` (about 1e-19, i.e. black); values above 1.99 mark empty pixels.

    Parameters
    ----------
    codes : array_like of int
        Codes in [0, 65535].

    Returns
    -------
    ndarray of float32
        Same shape as ``codes``.

    Raises
    ------
    ValueError
        If a code is outside [0, 65535].

    Examples
    --------
    >>> decode_ufloat16([0xFC00, 0xF800, 0xFA00]).tolist()
    [1.0, 0.5, 0.75]
    """
    arr = np.asarray(codes)
    if arr.size and (not np.issubdtype(arr.dtype, np.integer) or arr.min() < 0 or arr.max() > 0xFFFF):
        raise ValueError(f"ufloat16 codes must be integers in [0, 65535], got dtype {arr.dtype}")
    return _ufloat16_table()[arr.astype(np.uint16, copy=False)]


# --------------------------------------------------------------------------- container


@dataclass(frozen=True)
class _Chunk:
    """A data chunk found in the file (positions are absolute byte offsets)."""

    offset: int
    key: tuple[int, int, int]
    slice_id: int
    ind: int
    type: int
    payload_start: int
    payload_end: int


@dataclass(frozen=True)
class _BscanRef:
    slice_id: int
    pixel_start: int
    height: int
    width: int
    chunk_offset: int


@dataclass
class _SeriesIndex:
    """Everything known about one (patient, study, series) key, without pixels."""

    key: tuple[int, int, int]
    bscans: list[_BscanRef] = field(default_factory=list)
    meta: dict[int, dict[str, Any]] = field(default_factory=dict)
    layers: dict[int, dict[int, tuple[int, int]]] = field(default_factory=dict)
    lateralities: set[str] = field(default_factory=set)
    duplicates: int = 0


@contextmanager
def _mapped(path: Path) -> Iterator[mmap.mmap]:
    """Map the file read-only; errors opening it become :class:`OctpipeError`."""
    try:
        fh = open(path, "rb")  # noqa: SIM115 - closed below
    except FileNotFoundError:
        raise OctpipeError("file not found", path) from None
    except OSError as exc:
        raise OctpipeError(f"cannot open: {exc.strerror or exc}", path) from None
    with fh:
        size = path.stat().st_size
        if size == 0:
            raise FormatError("empty file, not a Heidelberg E2E (CMDb) file", path)
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            yield buf


def _locate_base(buf: mmap.mmap, path: Path) -> int:
    """Return the position of the ``CMDb`` header, checking magic and minimum size."""
    base = _MULTI_PREAMBLE if buf[:len(_MAGIC_MULTI)] == _MAGIC_MULTI else 0
    magic = buf[base:base + len(_MAGIC_FILE)]
    if magic != _MAGIC_FILE:
        raise FormatError(f"not a Heidelberg E2E file: magic is {bytes(buf[:4])!r}, expected {_MAGIC_FILE!r}", path)
    if len(buf) < base + _FIRST_CHUNK:
        raise CorruptFileError(f"file is {len(buf)} bytes, shorter than the {base + _FIRST_CHUNK}-byte E2E header",
                               path)
    return base


def _magic_at(buf: mmap.mmap, pos: int) -> Literal["data", "dir"] | None:
    if buf[pos:pos + len(_MAGIC_DATA)] == _MAGIC_DATA:
        return "data"
    if buf[pos:pos + len(_MAGIC_DIR)] == _MAGIC_DIR:
        return "dir"
    return None


def _next_magic(buf: mmap.mmap, start: int) -> int:
    """Position of the next ``MDbData``/``MDbDir`` header at or after ``start``, else len(buf)."""
    pos = start
    while True:
        pos = buf.find(_MAGIC_PREFIX, pos)
        if pos < 0:
            return len(buf)
        if _magic_at(buf, pos) is not None:
            return pos
        pos += 1


def _chunk_from_header(buf: mmap.mmap, offset: int, payload_end: int) -> _Chunk:
    h = _unpack(_CHUNK_HEADER_FIELDS, _CHUNK_HEADER, buf, offset)
    key = (int(h["patient_id"]), int(h["study_id"]), int(h["series_id"]))
    return _Chunk(offset=offset, key=key, slice_id=int(h["slice_id"]), ind=int(h["ind"]),
                  type=int(h["type"]), payload_start=offset + _CHUNK_HEADER.size,
                  payload_end=payload_end)


def _chunks_from_directory(buf: mmap.mmap, base: int, path: Path) -> list[_Chunk] | None:
    """Chunks listed by the directory, or None when the directory is missing or stale.

    Raises CorruptFileError when the directory is consistent but lists chunks past
    the end of the file (the file is truncated).
    """
    end = len(buf)
    main = _unpack(_DIRECTORY_HEADER_FIELDS, _DIRECTORY_HEADER, buf, base + _FILE_HEADER.size)
    if not main["magic"].startswith(_MAGIC_MAIN_DIR):
        return None
    entries: list[dict[str, Any]] = []
    seen: set[int] = set()
    pos = int(main["current"])
    while pos != 0:
        at = base + pos
        if pos in seen or len(seen) >= _MAX_DIRECTORY_CHUNKS or at + _DIRECTORY_HEADER.size > end:
            return None
        seen.add(pos)
        if _magic_at(buf, at) != "dir":
            return None
        head = _unpack(_DIRECTORY_HEADER_FIELDS, _DIRECTORY_HEADER, buf, at)
        n = int(head["num_entries"])
        if at + _DIRECTORY_HEADER.size + n * _DIRECTORY_ENTRY.size > end:
            return None
        for k in range(n):
            entry = _unpack(_DIRECTORY_ENTRY_FIELDS, _DIRECTORY_ENTRY, buf,
                            at + _DIRECTORY_HEADER.size + k * _DIRECTORY_ENTRY.size)
            if int(entry["start"]) > int(entry["pos"]):
                entries.append(entry)
        pos = int(head["prev"])
    if not entries:
        return None

    chunks: dict[int, _Chunk] = {}
    past_end = 0
    for entry in entries:
        start = base + int(entry["start"])
        size = int(entry["size"])
        if start + _CHUNK_HEADER.size > end:
            past_end += 1
            continue
        if _magic_at(buf, start) != "data":
            return None
        head = _unpack(_CHUNK_HEADER_FIELDS, _CHUNK_HEADER, buf, start)
        same = all(head[k] == entry[k] for k in ("patient_id", "study_id", "series_id", "slice_id", "type"))
        if int(head["size"]) != size or not same:
            return None
        if start + _CHUNK_HEADER.size + size > end:
            past_end += 1
            continue
        chunks[start] = _chunk_from_header(buf, start, start + _CHUNK_HEADER.size + size)
    if past_end:
        raise CorruptFileError(f"file is truncated: the directory lists {past_end} chunk(s) that end past its "
                               f"last byte ({end})", path)
    return [chunks[k] for k in sorted(chunks)]


def _walk_chunks(buf: mmap.mmap, base: int, path: Path) -> list[_Chunk]:
    """Walk the data chunks one after the other, re-synchronising on chunk magics."""
    end = len(buf)
    main_ok = buf[base + _FILE_HEADER.size:base + _FILE_HEADER.size + len(_MAGIC_MAIN_DIR)] == _MAGIC_MAIN_DIR
    pos = base + (_FIRST_CHUNK if main_ok else _FILE_HEADER.size)
    chunks: list[_Chunk] = []
    while pos < end:
        kind = _magic_at(buf, pos)
        if kind is None:
            pos = _next_magic(buf, pos + 1)
            continue
        if kind == "dir":
            pos = _next_magic(buf, pos + len(_MAGIC_DIR))
            continue
        if pos + _CHUNK_HEADER.size > end:
            raise CorruptFileError(f"file is truncated: it ends inside the chunk header at byte {pos}", path)
        size = _CHUNK_HEADER.unpack_from(buf, pos)[4]
        declared_end = pos + _CHUNK_HEADER.size + size
        if declared_end <= end and (declared_end + len(_MAGIC_DATA) > end or _magic_at(buf, declared_end)):
            payload_end = nxt = declared_end
        else:
            nxt = _next_magic(buf, pos + _CHUNK_HEADER.size)
            if nxt == end and declared_end > end:
                raise CorruptFileError(f"file is truncated: the chunk at byte {pos} declares {size} payload bytes, "
                                       f"{end - pos - _CHUNK_HEADER.size} remain", path)
            # A stale size: the payload ends where the next chunk starts (or at the declared end
            # when unknown bytes follow it).
            payload_end = min(declared_end, nxt)
        chunks.append(_chunk_from_header(buf, pos, payload_end))
        pos = nxt
    return chunks


def _index(buf: mmap.mmap, path: Path) -> tuple[list[_SeriesIndex], str]:
    """Find the chunks and group what the reader needs by series, without decoding pixels."""
    base = _locate_base(buf, path)
    chunks = _chunks_from_directory(buf, base, path)
    source = "directory"
    if chunks is None:
        chunks, source = _walk_chunks(buf, base, path), "chunk_walk"

    series: dict[tuple[int, int, int], _SeriesIndex] = {}
    for ch in chunks:
        n_payload = ch.payload_end - ch.payload_start
        if ch.type == _TYPE_PATIENT:
            continue  # never decoded
        idx = series.setdefault(ch.key, _SeriesIndex(ch.key))
        if ch.type == _TYPE_IMAGE:
            _index_image(buf, ch, idx, path)
        elif ch.type == _TYPE_LATERALITY and n_payload >= _LATERALITY.size:
            value = _unpack(_LATERALITY_FIELDS, _LATERALITY, buf, ch.payload_start)["laterality"]
            if value in _LATERALITIES:
                idx.lateralities.add(_LATERALITIES[value])
        elif ch.type == _TYPE_BSCAN_META and n_payload >= _BSCAN_META.size and ch.slice_id >= 0:
            meta = unpack(_BSCAN_META_FIELDS, _BSCAN_META, buf, ch.payload_start, decode_text=False)
            idx.meta.setdefault(ch.slice_id, meta)  # without the acquisition time (identifying)
        elif ch.type == _TYPE_LAYER and n_payload >= _LAYER_HEADER.size and ch.slice_id >= 0:
            head = _unpack(_LAYER_HEADER_FIELDS, _LAYER_HEADER, buf, ch.payload_start)
            width = int(head["width"])
            if 0 < width and _LAYER_HEADER.size + 4 * width <= n_payload:
                rows_start = ch.payload_end - 4 * width
                idx.layers.setdefault(ch.slice_id, {}).setdefault(int(head["layer_id"]),
                                                                  (rows_start, width))

    found = []
    for key in sorted(series):
        idx = series[key]
        if not idx.bscans:
            continue
        idx.bscans.sort(key=lambda b: b.slice_id)
        shapes = {(b.height, b.width) for b in idx.bscans}
        if len(shapes) > 1:
            raise CorruptFileError(f"series {len(found)}: B-scans have different sizes {sorted(shapes)}", path)
        found.append(idx)
    if not found:
        raise CorruptFileError("no OCT B-scans found", path)
    return found, source


def _index_image(buf: mmap.mmap, ch: _Chunk, idx: _SeriesIndex, path: Path) -> None:
    n_payload = ch.payload_end - ch.payload_start
    if n_payload < _IMAGE_HEADER.size:
        if ch.ind == 1:
            raise CorruptFileError(f"B-scan chunk at byte {ch.offset} holds {n_payload} bytes, less than its "
                                   f"{_IMAGE_HEADER.size}-byte image header", path)
        return
    head = _unpack(_IMAGE_HEADER_FIELDS, _IMAGE_HEADER, buf, ch.payload_start)
    image_type = int(head["image_type"])
    if image_type == _IMAGE_LOCALIZER or (image_type != _IMAGE_BSCAN and ch.ind != 1) or ch.slice_id < 0:
        return
    height, width = int(head["height"]), int(head["width"])
    need = 2 * height * width
    have = n_payload - _IMAGE_HEADER.size
    if height == 0 or width == 0 or need > have:
        raise CorruptFileError(f"B-scan chunk at byte {ch.offset} (slice {ch.slice_id}) declares {height}x{width} "
                               f"pixels ({need} bytes) but holds {have} bytes", path)
    if any(b.slice_id == ch.slice_id for b in idx.bscans):
        idx.duplicates += 1
        return
    idx.bscans.append(_BscanRef(ch.slice_id, ch.payload_start + _IMAGE_HEADER.size, height, width, ch.offset))


# --------------------------------------------------------------------------- geometry


def _finite(*values: object) -> bool:
    return all(isinstance(v, (int, float)) and np.isfinite(v) for v in values)


def _spacing(idx: _SeriesIndex, n_bscans: int, width: int) -> tuple[tuple[float, float, float], dict[str, str]]:
    """Spacing (between B-scans, axial, lateral) in mm, and where each value came from."""
    metas = [idx.meta[b.slice_id] for b in idx.bscans if b.slice_id in idx.meta]
    first = metas[0] if metas else {}

    axial, axial_src = _DEFAULT_AXIAL_MM, "default"
    scale_y = first.get("scale_y")
    if _finite(scale_y) and 0.0005 < float(scale_y) < 0.05:
        axial, axial_src = float(scale_y), "file"

    lateral, lateral_src = _DEFAULT_LATERAL_MM, "default"
    if first and first.get("scan_pattern") != 2:
        sx, sy, ex, ey = (first.get(k) for k in ("start_x", "start_y", "end_x", "end_y"))
        used = int(first.get("img_size_width") or 0)
        used = used if 0 < used <= width else width
        if _finite(sx, sy, ex, ey):
            angle = float(np.hypot(float(ex) - float(sx), float(ey) - float(sy)))
            estimate = angle * _MM_PER_DEGREE / used
            if 0 < angle <= 60 and 0.001 <= estimate <= 0.1:
                lateral, lateral_src = estimate, "estimated"

    between, between_src = _DEFAULT_BSCAN_MM, "default"
    centres = [(m.get("center_x"), m.get("center_y")) for m in metas]
    centres = [c for c in centres if _finite(*c)]
    if n_bscans > 1 and len(centres) >= 2:
        (x0, y0), (x1, y1) = centres[0], centres[-1]
        estimate = float(np.hypot(x1 - x0, y1 - y0)) * _MM_PER_DEGREE / (len(centres) - 1)
        if 0 < estimate <= 2.0:
            between, between_src = estimate, "estimated"
    return (between, axial, lateral), {"bscan": between_src, "axial": axial_src, "lateral": lateral_src}


def _layer_name(layer_id: int) -> str:
    return HEYEX_LAYER_NAMES[layer_id] if 0 <= layer_id < len(HEYEX_LAYER_NAMES) else f"heyex_{layer_id}"


# --------------------------------------------------------------------------- public readers


@dataclass(frozen=True)
class E2ESeriesInfo:
    """Summary of one OCT series of an E2E file (from headers only, no pixels decoded).

    Parameters
    ----------
    index : int
        Series number, as in the list :func:`read_heyex_e2e` returns.
    n_bscans : int
        B-scans found.
    bscan_shape : tuple of int
        ``(n_axial, n_ascans)`` of each B-scan.
    laterality : {"OD", "OS"} or None
        Eye, from the series' laterality chunks.
    scan_pattern : str
        From the B-scan headers, ``"unknown"`` when there are none.
    layer_names : tuple of str
        Boundaries found in the segmentation chunks.
    index_source : {"directory", "chunk_walk"}
        How the chunks were found.
    """

    index: int
    n_bscans: int
    bscan_shape: tuple[int, int]
    laterality: str | None
    scan_pattern: str
    layer_names: tuple[str, ...]
    index_source: str


def _laterality(idx: _SeriesIndex) -> str | None:
    return next(iter(idx.lateralities)) if len(idx.lateralities) == 1 else None


def _scan_pattern(idx: _SeriesIndex) -> tuple[str, int | None]:
    for b in idx.bscans:
        if b.slice_id in idx.meta:
            code = int(idx.meta[b.slice_id]["scan_pattern"])
            return _SCAN_PATTERNS.get(code, "unknown"), code
    return "unknown", None


def _layer_ids(idx: _SeriesIndex) -> list[int]:
    return sorted({i for by_id in idx.layers.values() for i in by_id})


def inspect_heyex_e2e(path: str | Path) -> list[E2ESeriesInfo]:
    """Describe the OCT series of an E2E file cheaply (headers only, no pixels decoded).

    Parameters
    ----------
    path : str or Path
        The ``.E2E`` file.

    Returns
    -------
    list of E2ESeriesInfo
        One per series that holds B-scans, in the order :func:`read_heyex_e2e` uses.

    Raises
    ------
    FormatError
        If the file is not an E2E (``CMDb``) file.
    CorruptFileError
        If it is truncated or inconsistent, or holds no OCT B-scans.

    Examples
    --------
    >>> import tempfile
    >>> from octpipe.testing.heyex_e2e_files import write_heyex_e2e_minimal
    >>> path = write_heyex_e2e_minimal(Path(tempfile.mkdtemp()) / "a.E2E", [np.full((3, 8, 16), 0.01)])
    >>> [(s.n_bscans, s.bscan_shape) for s in inspect_heyex_e2e(path)]
    [(3, (8, 16))]
    """
    path = Path(path)
    with _mapped(path) as buf:
        found, source = _index(buf, path)
    return [E2ESeriesInfo(index=i, n_bscans=len(idx.bscans), bscan_shape=(idx.bscans[0].height, idx.bscans[0].width),
                          laterality=_laterality(idx), scan_pattern=_scan_pattern(idx)[0],
                          layer_names=tuple(_layer_name(k) for k in _layer_ids(idx)), index_source=source)
            for i, idx in enumerate(found)]


def count_heyex_e2e_series(path: str | Path) -> int:
    """Return how many OCT series (volumes) :func:`read_heyex_e2e` would return.

    Parameters
    ----------
    path : str or Path
        The ``.E2E`` file.

    Returns
    -------
    int
        Number of series holding B-scans (>= 1).

    Raises
    ------
    FormatError, CorruptFileError
        As :func:`inspect_heyex_e2e`.

    Examples
    --------
    >>> import tempfile
    >>> from octpipe.testing.heyex_e2e_files import write_heyex_e2e_minimal
    >>> path = write_heyex_e2e_minimal(Path(tempfile.mkdtemp()) / "b.E2E",
    ...                                [np.full((2, 8, 16), 0.01), np.full((1, 8, 16), 0.02)])
    >>> count_heyex_e2e_series(path)
    2
    """
    return len(inspect_heyex_e2e(path))


def read_heyex_e2e(path: str | Path, *, series: Sequence[int] | None = None) -> list[OctVolume]:
    """Read the OCT series of a Heidelberg ``.E2E`` file, one volume per series.

    Series are the (patient, study, series) keys of the chunk headers that hold
    B-scans, in ascending key order; B-scans are ordered by slice index.

    Parameters
    ----------
    path : str or Path
        The ``.E2E`` file.
    series : sequence of int, optional
        Series numbers to read (see :func:`inspect_heyex_e2e`); all when None.

    Returns
    -------
    list of OctVolume
        ``data`` float32 (n_bscans, n_axial, n_ascans), linear reflectivity;
        ``invalid`` marks empty pixels (0 in ``data``); ``layers`` from the
        segmentation chunks, NaN where missing; vendor ``"heidelberg"``.

    Raises
    ------
    FormatError
        If the file is not an E2E (``CMDb``) file.
    CorruptFileError
        If it is truncated or inconsistent (a size that does not fit the file), or
        holds no OCT B-scans.
    ValueError
        If a number in ``series`` is out of range.

    Examples
    --------
    >>> import tempfile
    >>> from octpipe.testing.heyex_e2e_files import write_heyex_e2e_minimal
    >>> path = write_heyex_e2e_minimal(Path(tempfile.mkdtemp()) / "c.E2E", [np.full((2, 8, 16), 0.01)],
    ...                                lateralities=["OD"])
    >>> [(v.shape, v.laterality, v.intensity) for v in read_heyex_e2e(path)]
    [((2, 8, 16), 'OD', 'linear')]
    """
    path = Path(path)
    with _mapped(path) as buf:
        found, source = _index(buf, path)
        wanted = range(len(found)) if series is None else list(series)
        for i in wanted:
            if not 0 <= i < len(found):
                raise ValueError(f"series must be in [0, {len(found) - 1}], got {i}")
        digest = file_sha256(path)
        table = _ufloat16_table()
        return [_decode_series(buf, found[i], i, source, table, path, digest) for i in wanted]


def _decode_series(buf: mmap.mmap, idx: _SeriesIndex, number: int, source: str, table: npt.NDArray[np.float32],
                   path: Path, digest: str) -> OctVolume:
    n = len(idx.bscans)
    height, width = idx.bscans[0].height, idx.bscans[0].width
    data = np.empty((n, height, width), dtype=np.float32)
    for j, ref in enumerate(idx.bscans):
        raw = np.frombuffer(buf[ref.pixel_start:ref.pixel_start + 2 * height * width], dtype="<u2")
        data[j] = table[raw].reshape(height, width)
    invalid = ~(data <= _INVALID_ABOVE)
    data[invalid] = 0.0

    layers: dict[str, npt.NDArray[np.float32]] = {}
    skipped = 0
    for layer_id in _layer_ids(idx):
        rows = np.full((n, width), np.nan, dtype=np.float32)
        for j, ref in enumerate(idx.bscans):
            where = idx.layers.get(ref.slice_id, {}).get(layer_id)
            if where is None:
                continue
            start, count = where
            if count != width:
                skipped += 1
                continue
            values = np.frombuffer(buf[start:start + 4 * count], dtype="<f4")
            ok = np.isfinite(values) & (values >= 0) & (values < INVALID_FROM)
            rows[j] = np.where(ok, values, np.nan)
        layers[_layer_name(layer_id)] = rows

    spacing, sources = _spacing(idx, n, width)
    weakest = min(sources.values(), key=_SOURCE_RANK.__getitem__)
    pattern, pattern_code = _scan_pattern(idx)
    meta: dict[str, object] = {"index_source": source, "source_dtype": "ufloat16", "spacing_sources": sources}
    first_meta = next((idx.meta[b.slice_id] for b in idx.bscans if b.slice_id in idx.meta), None)
    if first_meta is not None:
        meta["scan_pattern_code"] = pattern_code
        meta["n_bscans_declared"] = int(first_meta["n_bscans"])
    if idx.duplicates:
        meta["duplicate_bscans_ignored"] = idx.duplicates
    if skipped:
        meta["layer_rows_skipped"] = skipped
    if len(idx.lateralities) > 1:
        meta["laterality_conflict"] = True
    prov, volume_id = make_provenance(path, reader="heyex_e2e", format="heyex-e2e", series=number, sha256=digest)
    return OctVolume(data=data, spacing_mm=spacing, spacing_source=weakest, laterality=_laterality(idx),
                     scan_pattern=pattern, vendor="heidelberg", intensity="linear", invalid=invalid, layers=layers,
                     volume_id=volume_id, provenance=prov, bscan_order="inferior_first", meta=meta)
