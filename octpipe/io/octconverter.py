"""Topcon ``.fda``/``.fds``, Zeiss ``.img`` and Bioptigen ``.OCT`` through oct-converter, under numpy 2.

Each reader checks what it can cheaply before oct-converter runs (magic, chunk and
image sizes against the file length, so that no size read from a damaged file leads
to a huge allocation), then calls oct-converter, and turns its result into an
:class:`~octpipe.volume.OctVolume`: data float32 (n_bscans, n_axial, n_ascans) in the
vendor's display domain (``intensity="display"``, values as stored: 0-255 for 8-bit
data, raw counts for 16-bit data, never rescaled), spacing from oct-converter's
``pixel_spacing`` when it gives one, laterality OD/OS, vendor layers. Every exception
raised inside oct-converter becomes a :class:`~octpipe.errors.CorruptFileError` (or
:class:`~octpipe.errors.FormatError` when the header is not the format's) whose
one-line message names the file and the reason. Patient fields that oct-converter
decodes (names, birth date, ids, device serial numbers) are dropped, never copied.

numpy 2
-------
oct-converter 0.7.0 calls ``np.fromstring(raw_bytes, dtype=...)``, whose binary mode
numpy 2 removed (it raises ``ValueError``). Call sites in the installed package:

* ``readers/fda.py``: ``FDA.get_list_of_file_chunks`` (2), ``FDA.read_oct_data_chunk`` (2);
* ``readers/fds.py``: ``FDS.get_list_of_file_chunks`` (2), ``FDS.read_oct_volume`` (1),
  ``FDS.read_fundus_image`` (1);
* ``readers/e2e_Wedward.py`` (1; not used by octpipe, which has its own E2E parser).

``img.py`` and ``poct.py`` use ``np.frombuffer`` and ``boct.py`` ``np.fromfile``; they
need nothing. While an octpipe reader calls oct-converter, :func:`_numpy2_compat`
rebinds the module-global name ``np`` *of the two modules above only* to a proxy of
numpy whose ``fromstring`` does ``np.frombuffer(raw, dtype, count).copy()`` for binary
input (what numpy 1 did) and defers to numpy for text input (``sep`` given); every
other attribute is numpy's. numpy itself is never changed, so ``np.fromstring`` stays
numpy's own everywhere, and the binding is restored when the call ends.

Thread safety: the rebinding is serialised by a module lock, so concurrent octpipe
readers cannot interleave their save/restore; octpipe readers of these formats run
one at a time per process (use processes for parallel ingestion, as the readers are
GIL-bound anyway). Code that calls ``oct_converter.readers.FDA``/``FDS`` directly in
another thread during such a read sees the proxy, which only makes it work. The
wrapper also captures oct-converter's ``print`` output (``contextlib.redirect_stdout``,
process-wide for the duration of the call) so that it does not reach the user's
terminal; its text is used to detect a partial Bioptigen load.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import math
import struct
import threading
import types
from collections.abc import Iterator, Mapping, Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from octpipe.errors import CorruptFileError, FormatError, OctpipeError, UnsupportedFormatError
from octpipe.io._common import make_provenance
from octpipe.volume import OctVolume

__all__ = ["read_topcon_fda", "read_topcon_fds", "read_zeiss_img", "read_bioptigen_oct"]

# --------------------------------------------------------------------------- numpy 2 shim

#: oct-converter modules that call ``np.fromstring`` on bytes (oct-converter 0.7.0).
_FROMSTRING_MODULES = ("oct_converter.readers.fda", "oct_converter.readers.fds")
_LOCK = threading.RLock()


def _binary_fromstring(string: Any, dtype: npt.DTypeLike = float, count: int = -1, sep: str = "") -> np.ndarray:
    """``np.fromstring`` as numpy 1 had it: binary input is copied out of the buffer."""
    if sep != "":
        return np.fromstring(string, dtype=dtype, count=count, sep=sep)
    return np.frombuffer(string, dtype=dtype, count=count).copy()


class _NumpyWithBinaryFromstring(types.ModuleType):
    """numpy as oct-converter's fda/fds modules see it inside :func:`_numpy2_compat`."""

    def __init__(self) -> None:
        super().__init__("numpy")
        self.fromstring = _binary_fromstring

    def __getattr__(self, name: str) -> Any:
        return getattr(np, name)


_NUMPY_PROXY = _NumpyWithBinaryFromstring()


@contextlib.contextmanager
def _numpy2_compat() -> Iterator[None]:
    """Let oct-converter's ``np.fromstring(bytes)`` calls work under numpy 2 (see module docstring)."""
    with _LOCK:
        modules = [importlib.import_module(name) for name in _FROMSTRING_MODULES]
        # Only modules that bind numpy as ``np`` (all of them in 0.7.0) are patched.
        saved = [(module, module.__dict__["np"]) for module in modules if module.__dict__.get("np") is np]
        for module, _ in saved:
            module.np = _NUMPY_PROXY
        try:
            yield
        finally:
            for module, original in saved:
                module.np = original


def _one_line(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


@contextlib.contextmanager
def _oct_converter_call(path: Path) -> Iterator[io.StringIO]:
    """Run oct-converter code: numpy 2 shim, captured stdout, exceptions as OctpipeError."""
    captured = io.StringIO()
    try:
        with _numpy2_compat(), contextlib.redirect_stdout(captured):
            yield captured
    except OctpipeError:
        raise
    except MemoryError:
        raise CorruptFileError("oct-converter ran out of memory (an implausible size in the file)", path) from None
    except Exception as exc:
        raise CorruptFileError(f"oct-converter could not read the file: {_one_line(exc)}", path) from exc


def _oct_converter_version() -> str:
    try:
        return version("oct-converter")
    except PackageNotFoundError:  # pragma: no cover - it is a dependency
        return "unknown"


# --------------------------------------------------------------------------- shared conversion


_LATERALITY = {"R": "OD", "L": "OS", "OD": "OD", "OS": "OS"}


def _existing(path: str | Path) -> Path:
    """The path, once oct-converter is known to be importable and the file to exist."""
    try:
        importlib.import_module("oct_converter.readers")
    except ImportError as exc:  # pragma: no cover - a core dependency
        raise ImportError(f"reading Topcon, Zeiss and Bioptigen files needs oct-converter "
                          f"(pip install oct-converter): {exc}") from exc
    path = Path(path)
    if not path.is_file():
        raise OctpipeError("file not found" if not path.exists() else "not a regular file", path)
    return path


def _stack_bscans(slices: Sequence[Any] | None, path: Path) -> tuple[npt.NDArray[np.float32], str]:
    """Stack oct-converter's per-B-scan 2-D arrays into float32 (n_bscans, rows, cols)."""
    if slices is None or len(slices) == 0:
        raise CorruptFileError("oct-converter found no B-scans", path)
    arrays = [np.asarray(s) for s in slices]
    for i, a in enumerate(arrays):
        if a.ndim != 2 or min(a.shape) < 1:
            raise UnsupportedFormatError(f"B-scan {i} has shape {a.shape}; expected a 2-D grayscale image", path)
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise CorruptFileError(f"B-scans have different sizes {sorted(shapes)}", path)
    return np.stack(arrays).astype(np.float32), str(arrays[0].dtype)


def _spacing(pixel_spacing: Sequence[float] | None, default: tuple[float, float, float]
             ) -> tuple[tuple[float, float, float], str]:
    """oct-converter's [x (lateral), y (between B-scans), z (axial)] mm -> ours, or the default."""
    if pixel_spacing is not None and len(pixel_spacing) == 3:
        lateral, between, axial = (float(v) for v in pixel_spacing)
        if all(math.isfinite(v) and v > 0 for v in (lateral, between, axial)):
            return (between, axial, lateral), "file"
    return default, "default"


def _nominal_spacing(shape: tuple[int, ...], width_mm: float, height_mm: float,
                     depth_mm: float) -> tuple[float, float, float]:
    n, rows, cols = shape
    return (height_mm / n if n > 1 else 0.0, depth_mm / rows, width_mm / cols)


def _contours_to_layers(contours: Mapping[str, Any] | None, shape: tuple[int, int, int]
                        ) -> tuple[dict[str, npt.NDArray[np.float32]], list[str]]:
    """oct-converter contours (row from the top, one row of values per B-scan) -> layers.

    Values outside [0, n_axial) become NaN. A contour whose shape is not
    (n_bscans, n_ascans) is dropped and named in the second return value.
    """
    n, rows, cols = shape
    layers: dict[str, npt.NDArray[np.float32]] = {}
    dropped: list[str] = []
    for name, values in (contours or {}).items():
        try:
            arr = np.asarray(values, dtype=np.float64)
        except (TypeError, ValueError):
            dropped.append(f"{name}: not numeric")
            continue
        if arr.shape != (n, cols):
            dropped.append(f"{name}: shape {arr.shape} does not match (n_bscans, n_ascans) = {(n, cols)}")
            continue
        ok = np.isfinite(arr) & (arr >= 0) & (arr < rows)
        layers[str(name)] = np.where(ok, arr, np.nan).astype(np.float32)
    return layers, dropped


def _volume(data: npt.NDArray[np.float32], *, path: Path, reader: str, fmt: str, spacing: tuple[float, float, float],
            spacing_source: str, laterality: str | None, vendor: str, scan_pattern: str,
            layers: dict[str, npt.NDArray[np.float32]] | None = None, meta: dict[str, object]) -> OctVolume:
    prov, volume_id = make_provenance(path, reader=reader, format=fmt)
    meta = {"oct_converter_version": _oct_converter_version(), **meta}
    return OctVolume(data=data, spacing_mm=spacing, spacing_source=spacing_source,
                     laterality=_LATERALITY.get(laterality or ""), scan_pattern=scan_pattern, vendor=vendor,
                     intensity="display", invalid=None, layers=layers or {}, volume_id=volume_id, provenance=prov,
                     bscan_order="unknown", meta=meta)


# --------------------------------------------------------------------------- Topcon

# Topcon container: "FOCT" + 3-byte type + two uint32 versions (15 bytes), then chunks
# (uint8 name length, name, uint32 size, payload) until a zero name length.
_TOPCON_HEADER_SIZE = 15
_TOPCON_SCAN_MODES = {2: "volume", 3: "radial"}  # fds_binary: 2 = 3D, 3 = radial, 4 = cross
_TOPCON_NOMINAL_MM = (6.0, 6.0)  # scan width and height of the common 3D macula scan
_TOPCON_NOMINAL_AXIAL_MM = 0.0035
# @IMG_JPEG header: scan_mode u8, unknown u32 x 2, width, height, number_slices, unknown (25 bytes)
_IMG_JPEG_HEADER = struct.Struct("<B6I")
# @IMG_SCAN_03 / @IMG_MOT_COMP_03 header: scan_mode u8, width, height, bits, number_slices u32, format u8, size u32
_IMG_RAW_HEADER = struct.Struct("<B4IBI")
# @CONTOUR_INFO header: id 20s, method u8, format u8, width, height, size u32 (34 bytes)
_CONTOUR_HEADER = struct.Struct("<20sBB3I")


def _chunk_label(name: bytes) -> str:
    """A chunk name for a one-line message: as is when printable ASCII, else its repr."""
    text = name.decode("ascii", "replace")
    return text if text.isprintable() and text.isascii() and len(text) <= 40 else repr(name[:40])


def _topcon_chunks(path: Path, types_ok: tuple[bytes, ...], name: str) -> dict[bytes, list[tuple[int, int]]]:
    """Bounds-checked list of Topcon chunks: name -> [(payload position, size), ...]."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(_TOPCON_HEADER_SIZE)
        if head[:4] != b"FOCT":
            raise FormatError(f"not a Topcon {name} file: magic is {head[:4]!r}, expected b'FOCT'", path)
        if head[4:7] not in types_ok:
            raise FormatError(f"not a Topcon {name} file: type is {head[4:7]!r}, expected one of {types_ok}", path)
        if len(head) < _TOPCON_HEADER_SIZE:
            raise CorruptFileError(f"file is {size} bytes, shorter than the Topcon header", path)
        chunks: dict[bytes, list[tuple[int, int]]] = {}
        pos = _TOPCON_HEADER_SIZE
        while True:
            fh.seek(pos)
            length = fh.read(1)
            if not length:
                raise CorruptFileError(f"file is truncated: the chunk list has no end marker ({size} bytes)", path)
            if length[0] == 0:
                return chunks
            chunk_name = fh.read(length[0])
            raw_size = fh.read(4)
            if len(chunk_name) < length[0] or len(raw_size) < 4:
                raise CorruptFileError(f"file is truncated inside the chunk header at byte {pos}", path)
            chunk_size = int.from_bytes(raw_size, "little")
            start = pos + 1 + length[0] + 4
            if start + chunk_size > size:
                raise CorruptFileError(f"chunk {_chunk_label(chunk_name)} at byte {pos} declares "
                                       f"{chunk_size} bytes, {size - start} remain", path)
            chunks.setdefault(chunk_name, []).append((start, chunk_size))
            pos = start + chunk_size


def _read_at(path: Path, pos: int, n: int) -> bytes:
    with open(path, "rb") as fh:
        fh.seek(pos)
        return fh.read(n)


def _check_raw_image(path: Path, chunk: bytes, where: tuple[int, int]) -> None:
    start, size = where
    if size < _IMG_RAW_HEADER.size:
        raise CorruptFileError(f"chunk {chunk.decode()} holds {size} bytes, less than its image header", path)
    _, width, height, _, slices, _, _ = _IMG_RAW_HEADER.unpack(_read_at(path, start, _IMG_RAW_HEADER.size))
    need = 2 * width * height * slices
    if need == 0 or need > size - _IMG_RAW_HEADER.size:
        raise CorruptFileError(f"chunk {chunk.decode()} declares {slices} B-scans of {height}x{width} uint16 "
                               f"({need} bytes) but holds {size - _IMG_RAW_HEADER.size}", path)


def _check_jpeg_image(path: Path, where: tuple[int, int]) -> None:
    start, size = where
    end = start + size
    if size < _IMG_JPEG_HEADER.size:
        raise CorruptFileError(f"chunk @IMG_JPEG holds {size} bytes, less than its image header", path)
    _, _, _, width, height, slices, _ = _IMG_JPEG_HEADER.unpack(_read_at(path, start, _IMG_JPEG_HEADER.size))
    if slices == 0 or 4 * slices > size - _IMG_JPEG_HEADER.size:
        raise CorruptFileError(f"chunk @IMG_JPEG declares {slices} B-scans, which do not fit its {size} bytes", path)
    pos = start + _IMG_JPEG_HEADER.size
    with open(path, "rb") as fh:
        for i in range(slices):
            fh.seek(pos)
            raw = fh.read(4)
            n = int.from_bytes(raw, "little", signed=True) if len(raw) == 4 else -1
            if n < 0 or pos + 4 + n > end:
                raise CorruptFileError(f"chunk @IMG_JPEG: B-scan {i} declares {n} bytes, beyond the chunk end", path)
            if i == 0:
                # oct-converter allocates height x width per B-scan from the chunk header and pastes the
                # decoded image in: a damaged size would make a huge, mostly empty volume. The JPEG 2000
                # codestream (SOC FF4F, SIZ FF51) states the real size: they must agree.
                siz = fh.read(24)
                if len(siz) == 24 and siz[:4] == b"\xff\x4f\xff\x51":
                    xsiz, ysiz, x0, y0 = struct.unpack(">4I", siz[8:24])
                    if (xsiz - x0, ysiz - y0) != (width, height):
                        raise CorruptFileError(f"chunk @IMG_JPEG declares {height}x{width} B-scans, its JPEG 2000 "
                                               f"codestream holds {ysiz - y0}x{xsiz - x0}", path)
            pos += 4 + n


def _check_contours(path: Path, chunks: dict[bytes, list[tuple[int, int]]]) -> None:
    for start, size in chunks.get(b"@CONTOUR_INFO", []):
        if size < _CONTOUR_HEADER.size:
            raise CorruptFileError(f"chunk @CONTOUR_INFO holds {size} bytes, less than its header", path)
        _, _, _, width, height, _ = _CONTOUR_HEADER.unpack(_read_at(path, start, _CONTOUR_HEADER.size))
        if 2 * width * height > size - _CONTOUR_HEADER.size:
            raise CorruptFileError(f"chunk @CONTOUR_INFO declares {height}x{width} uint16 values, more than its "
                                   f"{size} bytes", path)


def _single(path: Path, chunks: dict[bytes, list[tuple[int, int]]], name: bytes) -> tuple[int, int]:
    where = chunks[name]
    if len(where) > 1:
        raise UnsupportedFormatError(f"{len(where)} {name.decode()} chunks; oct-converter reads files with one", path)
    return where[0]


def _topcon_volume(oct_volume: Any, path: Path, *, reader: str, fmt: str, contours: bool) -> OctVolume:
    # oct-converter returns one 2-D array per B-scan: rows = axial samples (image height),
    # columns = A-scans (image width); stacking them gives (n_bscans, n_axial, n_ascans).
    data, dtype = _stack_bscans(oct_volume.volume, path)
    default = _nominal_spacing(data.shape, *_TOPCON_NOMINAL_MM, _TOPCON_NOMINAL_AXIAL_MM * data.shape[1])
    spacing, source = _spacing(oct_volume.pixel_spacing, default)
    header = oct_volume.oct_header or {}
    meta: dict[str, object] = {"source_dtype": dtype}
    if "scan_mode" in header:
        meta["scan_mode"] = int(header["scan_mode"])
    layers: dict[str, npt.NDArray[np.float32]] = {}
    if contours:
        layers, dropped = _contours_to_layers(oct_volume.contours, data.shape)
        if dropped:
            meta["layers_dropped"] = dropped
    pattern = _TOPCON_SCAN_MODES.get(int(header.get("scan_mode", -1)), "unknown")
    return _volume(data, path=path, reader=reader, fmt=fmt, spacing=spacing, spacing_source=source,
                   laterality=oct_volume.laterality, vendor="topcon", scan_pattern=pattern, layers=layers, meta=meta)


def read_topcon_fda(path: str | Path) -> OctVolume:
    """Read a Topcon ``.fda`` file (3D OCT-1000/2000) with oct-converter.

    The OCT image comes from the ``@IMG_JPEG`` chunk (JPEG 2000 B-scans, decoded by
    Pillow) or else ``@IMG_MOT_COMP_03`` (raw uint16); segmentation contours
    (``@CONTOUR_INFO``) become layers when they cover every B-scan.

    Parameters
    ----------
    path : str or Path
        The ``.fda`` file.

    Returns
    -------
    OctVolume
        ``data`` float32 (n_bscans, n_axial, n_ascans), values as stored (8-bit:
        0-255), ``intensity="display"``, vendor ``"topcon"``; spacing from the
        ``@PARAM_SCAN`` chunk (``spacing_source="file"``), else nominal
        6 x 6 mm, 3.5 um axial (``"default"``).

    Raises
    ------
    FormatError
        If the file does not start with ``FOCT`` + ``FDA``/``FAA``.
    CorruptFileError
        If a chunk or image size does not fit the file, or oct-converter fails.
    UnsupportedFormatError
        If the file has no OCT image chunk oct-converter reads.

    Examples
    --------
    >>> read_topcon_fda("missing.fda")
    Traceback (most recent call last):
    ...
    octpipe.errors.OctpipeError: missing.fda: file not found
    """
    path = _existing(path)
    chunks = _topcon_chunks(path, (b"FDA", b"FAA"), "FDA")
    if b"@IMG_JPEG" in chunks:
        _check_jpeg_image(path, _single(path, chunks, b"@IMG_JPEG"))
    elif b"@IMG_MOT_COMP_03" in chunks:
        _check_raw_image(path, b"@IMG_MOT_COMP_03", _single(path, chunks, b"@IMG_MOT_COMP_03"))
    else:
        raise UnsupportedFormatError("no OCT image chunk (@IMG_JPEG or @IMG_MOT_COMP_03)", path)
    _check_contours(path, chunks)
    with _oct_converter_call(path):
        from oct_converter.readers import FDA

        oct_volume = FDA(path).read_oct_volume()
    return _topcon_volume(oct_volume, path, reader="topcon_fda", fmt="topcon-fda", contours=True)


def read_topcon_fds(path: str | Path) -> OctVolume:
    """Read a Topcon ``.fds`` file (raw uint16 ``@IMG_SCAN_03`` volume) with oct-converter.

    Parameters
    ----------
    path : str or Path
        The ``.fds`` file.

    Returns
    -------
    OctVolume
        ``data`` float32 (n_bscans, n_axial, n_ascans), raw uint16 counts,
        ``intensity="display"``, vendor ``"topcon"``; spacing as in
        :func:`read_topcon_fda`.

    Raises
    ------
    FormatError
        If the file does not start with ``FOCT`` + ``FDS``.
    CorruptFileError
        If a chunk or image size does not fit the file, or oct-converter fails.
    UnsupportedFormatError
        If there is no ``@IMG_SCAN_03`` chunk (angiography and other variants).

    Examples
    --------
    >>> read_topcon_fds("missing.fds")
    Traceback (most recent call last):
    ...
    octpipe.errors.OctpipeError: missing.fds: file not found
    """
    path = _existing(path)
    chunks = _topcon_chunks(path, (b"FDS",), "FDS")
    if b"@IMG_SCAN_03" not in chunks:
        raise UnsupportedFormatError("no @IMG_SCAN_03 chunk; oct-converter 0.7 reads no other FDS variant", path)
    _check_raw_image(path, b"@IMG_SCAN_03", _single(path, chunks, b"@IMG_SCAN_03"))
    with _oct_converter_call(path):
        from oct_converter.readers import FDS

        oct_volume = FDS(path).read_oct_volume()
    return _topcon_volume(oct_volume, path, reader="topcon_fds", fmt="topcon-fds", contours=False)


# --------------------------------------------------------------------------- Zeiss

# Cirrus cubes (512 x 128 and 200 x 200 A-scans) cover 6 x 6 mm and 2 mm of depth.
_ZEISS_NOMINAL_MM = (6.0, 6.0, 2.0)


def read_zeiss_img(path: str | Path, *, rows: int = 1024, cols: int = 512, interlaced: bool = False) -> OctVolume:
    """Read a Zeiss Cirrus raw ``.img`` export (uint8, no header) with oct-converter.

    The file holds only pixels, so the B-scan size must be given. Laterality comes
    from ``OD``/``OS`` in the file name; spacing is not stored.

    Parameters
    ----------
    path : str or Path
        The ``.img`` file.
    rows : int
        Rows (axial samples) per B-scan, e.g. 1024.
    cols : int
        Columns (A-scans) per B-scan, e.g. 512 or 200.
    interlaced : bool
        De-interlace (oct-converter's option); needs ``rows == 2 * cols`` and yields
        twice as many B-scans of ``cols x rows / 2`` pixels.

    Returns
    -------
    OctVolume
        ``data`` float32 (n_bscans, rows, cols) as oct-converter orders each B-scan,
        values 0-255, ``intensity="display"``, vendor ``"zeiss"``, nominal spacing of
        a 6 x 6 x 2 mm cube (``spacing_source="default"``).

    Raises
    ------
    ValueError
        If ``rows``/``cols`` are not positive, or ``interlaced`` and ``rows != 2 * cols``.
    CorruptFileError
        If the file size is not a whole number of ``rows x cols`` B-scans, or
        oct-converter fails.

    Examples
    --------
    >>> read_zeiss_img("missing.img", rows=1024, cols=512)
    Traceback (most recent call last):
    ...
    octpipe.errors.OctpipeError: missing.img: file not found
    """
    if not (isinstance(rows, int) and isinstance(cols, int) and rows > 0 and cols > 0):
        raise ValueError(f"rows and cols must be positive integers, got rows={rows!r}, cols={cols!r}")
    if interlaced and rows != 2 * cols:
        raise ValueError(f"interlaced needs rows == 2 * cols, got rows={rows}, cols={cols}")
    path = _existing(path)
    size = path.stat().st_size
    frame = rows * cols
    if size < frame or size % frame:
        raise CorruptFileError(f"file size {size} is not a whole number of {rows}x{cols} uint8 B-scans "
                               f"({frame} bytes each); give the scan's rows and cols", path)
    with _oct_converter_call(path):
        from oct_converter.readers import IMG

        oct_volume = IMG(path).read_oct_volume(rows=rows, cols=cols, interlaced=interlaced)
    # oct-converter returns one 2-D array per B-scan, (rows, cols) = (axial, A-scans)
    # for non-interlaced data; interlaced data come rotated by 90 degrees, as it returns them.
    data, _ = _stack_bscans(oct_volume.volume, path)
    width, height, depth = _ZEISS_NOMINAL_MM
    spacing = _nominal_spacing(data.shape, width, height, depth)
    return _volume(data, path=path, reader="zeiss_img", fmt="zeiss-img", spacing=spacing, spacing_source="default",
                   laterality=oct_volume.laterality, vendor="zeiss", scan_pattern="unknown",
                   meta={"source_dtype": "uint8", "interlaced": interlaced})


# --------------------------------------------------------------------------- Bioptigen

_BIOPTIGEN_PATTERNS = {0: "line", 1: "volume", 3: "radial"}
_BIOPTIGEN_NOMINAL_MM = (6.0, 6.0, 2.0)


def _bioptigen_layout(path: Path) -> dict[str, Any]:
    """Parse the header and frame table with oct-converter's construct structs; check sizes."""
    from oct_converter.readers.binary_structs import boct_binary

    try:
        header = boct_binary.bioptigen_oct_header_struct.parse_file(str(path))
    except Exception as exc:
        raise FormatError(f"not a Bioptigen .OCT file: its header does not parse ({_one_line(exc, 160)})",
                          path) from None
    with _oct_converter_call(path):
        parsed = boct_binary.bioptigen_file_structure.parse_file(str(path))
    frames = parsed.data
    size = path.stat().st_size
    scantype = int(header.scantype.value)
    if scantype not in _BIOPTIGEN_PATTERNS:
        raise UnsupportedFormatError(f"scan type {scantype} is not one oct-converter reads (0, 1, 3)", path)
    if len(frames) == 0:
        raise CorruptFileError("no frames", path)
    depth = int(header.linelength.value)
    ascans = {int(f.header.framelines.value) for f in frames}
    if len(ascans) != 1 or depth < 1 or min(ascans) < 1:
        raise CorruptFileError(f"frames have A-scan counts {sorted(ascans)} and depth {depth}; expected one "
                               "positive count", path)
    for i, f in enumerate(frames):
        end = int(f.image.offset) + 2 * int(f.image.totalpixels)
        if end > size:
            raise CorruptFileError(f"file is truncated: frame {i} ends at byte {end}, the file has {size}", path)
    n_frames, n_scans = int(header.frames.value), int(header.scans.value)
    if n_frames * n_scans != len(frames):
        raise CorruptFileError(f"the header declares {n_frames} x {n_scans} frames, the file holds {len(frames)}",
                               path)
    lengths = {k: float(getattr(header, k).value) for k in ("scandepth", "scanlength", "azscanlength",
                                                              "elscanlength")}
    return {"scantype": scantype, "n_frames": n_frames, "n_scans": n_scans, "depth": depth,
            "n_ascans": ascans.pop(), "lengths": lengths}


def _bioptigen_spacing(layout: dict[str, Any], shape: tuple[int, int, int]
                       ) -> tuple[tuple[float, float, float], str, dict[str, str]]:
    """Spacing from the header's scan lengths (assumed mm), else nominal values."""
    n, rows, cols = shape
    lengths = layout["lengths"]

    def plausible(v: float, top: float) -> bool:
        return math.isfinite(v) and 0 < v <= top

    nominal = _nominal_spacing(shape, *_BIOPTIGEN_NOMINAL_MM)
    lateral_mm = lengths["azscanlength"] if plausible(lengths["azscanlength"], 50) else lengths["scanlength"]
    axial, axial_src = (lengths["scandepth"] / rows, "estimated") if plausible(lengths["scandepth"], 20) \
        else (nominal[1], "default")
    lateral, lateral_src = (lateral_mm / cols, "estimated") if plausible(lateral_mm, 50) else (nominal[2], "default")
    if layout["scantype"] != 1 or n == 1:
        between, between_src = 0.0, "estimated"  # repeated lines, radial lines, or a single B-scan
    elif plausible(lengths["elscanlength"], 50):
        between, between_src = lengths["elscanlength"] / (n - 1), "estimated"
    else:
        between, between_src = nominal[0], "default"
    sources = {"bscan": between_src, "axial": axial_src, "lateral": lateral_src}
    overall = "default" if "default" in sources.values() else "estimated"
    return (between, axial, lateral), overall, sources


def read_bioptigen_oct(path: str | Path, *, timepoint: int = 0) -> OctVolume:
    """Read a Bioptigen ``.OCT`` file with oct-converter.

    A Bioptigen file is a series of volumes over time. For rectangular and radial
    scans one time point is returned; for linear scans every frame (repeated B-scans
    at one position) forms the volume and ``timepoint`` must be 0.

    Parameters
    ----------
    path : str or Path
        The ``.OCT`` file.
    timepoint : int
        Which volume of the time series to return.

    Returns
    -------
    OctVolume
        ``data`` float32 (n_bscans, n_axial, n_ascans), raw uint16 counts,
        ``intensity="display"``, vendor ``"bioptigen"``; spacing estimated from the
        header's scan lengths (assumed mm), else nominal 6 x 6 x 2 mm
        (``meta["spacing_sources"]`` per axis); laterality from ``OD``/``OS`` in the
        file name.

    Raises
    ------
    FormatError
        If the header does not parse as a Bioptigen header.
    CorruptFileError
        If frames are missing or run past the end of the file, or oct-converter fails.
    UnsupportedFormatError
        For scan types oct-converter does not read.
    ValueError
        If ``timepoint`` is out of range.

    Examples
    --------
    >>> read_bioptigen_oct("missing.OCT")
    Traceback (most recent call last):
    ...
    octpipe.errors.OctpipeError: missing.OCT: file not found
    """
    path = _existing(path)
    layout = _bioptigen_layout(path)
    linear = layout["scantype"] == 0
    n_timepoints = 1 if linear else layout["n_frames"]
    if not 0 <= timepoint < n_timepoints:
        raise ValueError(f"timepoint must be in [0, {n_timepoints - 1}], got {timepoint}")
    with _oct_converter_call(path) as printed:
        from oct_converter.readers import BOCT

        volumes = BOCT(path).read_oct_volume()
    if "Stopping load" in printed.getvalue():
        first = printed.getvalue().strip().splitlines()[0] if printed.getvalue().strip() else "?"
        raise CorruptFileError(f"oct-converter stopped loading frames: {first[:200]}", path)
    # oct-converter returns, per time point, an array (n_bscans, n_ascans, depth): each frame
    # is stored A-scan by A-scan. Transposing the last two axes gives (n_bscans, n_axial, n_ascans).
    chosen: list[Any] = [np.asarray(v.volume) for v in volumes] if linear else [np.asarray(volumes[timepoint].volume)]
    stacked = np.concatenate(chosen, axis=0)
    data = np.ascontiguousarray(stacked.transpose(0, 2, 1), dtype=np.float32)
    spacing, source, sources = _bioptigen_spacing(layout, data.shape)
    meta: dict[str, object] = {"source_dtype": str(stacked.dtype), "spacing_sources": sources,
                               "n_timepoints": n_timepoints, "timepoint": timepoint}
    return _volume(data, path=path, reader="bioptigen_oct", fmt="bioptigen-oct", spacing=spacing,
                   spacing_source=source, laterality=volumes[0].laterality, vendor="bioptigen",
                   scan_pattern=_BIOPTIGEN_PATTERNS[layout["scantype"]], meta=meta)
