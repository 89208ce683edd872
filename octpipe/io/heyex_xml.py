"""Heidelberg Heyex XML exports: one ``.xml`` file plus one image file per B-scan.

Reader
    :func:`read_heyex_xml` reads the XML with :mod:`xml.etree.ElementTree` and the
    B-scan images it names with the helpers of :mod:`octpipe.io.images`.

Writer
    :mod:`octpipe.io.writers.heyex_xml` writes a small export in the same layout (for tests
    and phantoms); ``eyepy.import_heyex_xml`` reads it too.

Layout read (element paths below the root ``HEDX``; everything else is ignored)::

    HEDX/BODY
      SWVersion/Version                       -> meta["heyex_version"]
      Patient/...                             never read (names, birth date, ids)
      Patient/Study/Series                    exactly one Series holding OCT images
        Type                                  -> meta["series_type"] ("Volume", ...)
        Laterality                            "R" -> OD, "L" -> OS (else Image/Laterality)
        NumImages                             all Image elements of the Series
        Image                                 in document order
          ImageType/Type                      "OCT" (B-scan) or "LOCALIZER" (SLO)
          OphthalmicAcquisitionContext
            Width, Height                     image size in px (checked against the file)
            ScaleX, ScaleY                    lateral / axial pixel size in mm
            Start/Coord/X,Y  End/Coord/X,Y    B-scan end points on the localizer, mm
            ImageQuality                      -> meta["bscan_quality"]
            Angle, Focus                      localizer field (deg) and focus (dpt)
          ImageData/ExamURL                   image path (Windows path or file:// URL);
                                              only its last component is used
          Segmentation/SegLine                one per boundary
            Name                              "ILM", "BM", "RNFL", ...
            Array                             one row position per A-scan

Conventions
    - ``data`` holds the 8-bit (or 16-bit) pixel values as stored, as float32; the
      export is already display-mapped, so ``intensity="display"`` and
      ``meta["bit_depth"]`` records the depth. Nothing is rescaled.
    - ``spacing_mm`` is (mean Euclidean distance between the Start points of
      consecutive B-scans, ScaleY, ScaleX) of the first B-scan, ``spacing_source
      "file"``; 0 between B-scans for a single B-scan. When a B-scan lacks its Start
      or End point the B-scan distance falls back to the default 0.12 mm and
      ``spacing_source`` is ``"default"``.
    - ``scan_pattern`` comes from the geometry (the XML carries no pattern code):
      a B-scan whose lateral extent ``Width * ScaleX`` is about ``2 pi`` times the
      Start-End distance, or whose Start equals its End, is a circle (Heyex stores a
      circle's centre as its End point); one line is ``"line"``; parallel B-scans
      are ``"volume"``; B-scans of different directions sharing a midpoint are
      ``"radial"``; anything else is ``"unknown"``.
    - ``bscan_order``: the localizer's y grows downwards, so for a volume whose
      B-scan 0 has the largest Start y it is ``"inferior_first"``, the smallest
      ``"superior_first"``; equal y (vertical raster), radial and circle scans are
      ``"unknown"``; a single line is ``"inferior_first"`` as in the ``.vol`` reader.
    - Layers: values >= 3e38 (Heyex writes ``3e+038`` for "none"), negative, NaN or
      infinite become NaN; a boundary missing from some B-scans is NaN there.
    - Privacy: the Patient element (names, birth date, patient ids), dates, device
      and database ids and the image file names are never copied into the volume.
    - Safety: files declaring a DOCTYPE or ENTITY are refused (no entity expansion),
      the XML may be at most 256 MiB and name at most 4096 OCT images; the count is
      checked before any image is opened. Image names are reduced to their last path
      component, so an export cannot point outside its folder.
"""

from __future__ import annotations

import math
import re
import xml.etree.ElementTree as ET
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import numpy.typing as npt

from octpipe.errors import CorruptFileError, FormatError, UnsupportedFormatError
from octpipe.io._common import file_sha256, make_provenance
from octpipe.io._heyex import INVALID_FROM
from octpipe.io.images import DEFAULT_SPACING_MM, _read_single
from octpipe.volume import OctVolume

__all__ = ["read_heyex_xml", "MAX_XML_BYTES", "MAX_BSCANS"]

#: Largest XML file read (bytes); a 97-line, 1536 A-scan export with 19 boundaries is ~20 MB.
MAX_XML_BYTES = 256 * 1024 * 1024
#: Largest number of OCT B-scans (and of Image elements) accepted in one series.
MAX_BSCANS = 4096

_MAX_SIZE = 8192  # image rows / columns
_ENTITY_RE = re.compile(r"<!\s*(DOCTYPE|ENTITY)", re.IGNORECASE)
_ENCODING_RE = re.compile(rb"""^<\?xml[^>]*?encoding\s*=\s*["']([A-Za-z0-9._-]+)["']""")
_PARALLEL_SIN = math.sin(math.radians(1.0))  # directions within 1 degree are parallel
_CIRCLE_TOL = 0.1  # relative tolerance of the circumference test


# --------------------------------------------------------------------------- parsing helpers


def _decode(raw: bytes, path: Path) -> str:
    """Decode the XML bytes by BOM, then by the XML declaration, else UTF-8.

    Undecodable bytes are replaced (exports sometimes hold names in a code page
    other than the declared one; those fields are never read anyway).
    """
    if raw.startswith(b"\xef\xbb\xbf"):
        encoding = "utf-8-sig"
    elif raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        encoding = "utf-16"
    else:
        match = _ENCODING_RE.match(raw[:200])
        encoding = match.group(1).decode("ascii") if match else "utf-8"
    try:
        return raw.decode(encoding, errors="replace")
    except LookupError as exc:
        raise FormatError(f"unknown XML encoding {encoding!r}", path) from exc


def _parse_root(path: Path) -> ET.Element:
    """Read, screen and parse the XML file; return the ``BODY`` element."""
    if path.is_dir():
        raise FormatError("is a folder; pass the export's .xml file", path)
    size = path.stat().st_size  # FileNotFoundError when missing
    if size > MAX_XML_BYTES:
        raise FormatError(f"{size} bytes is too large for a Heyex XML export (at most {MAX_XML_BYTES})", path)
    raw = path.read_bytes()
    if not raw.strip():
        raise FormatError("empty file", path)
    text = _decode(raw, path)
    stripped = text.lstrip("\ufeff \t\r\n")
    if not stripped.startswith("<"):
        raise FormatError("not an XML file (does not start with '<')", path)
    found = _ENTITY_RE.search(text)
    if found:
        raise FormatError(f"XML with a <!{found.group(1).upper()} declaration is refused (entity expansion risk)",
                          path)
    try:
        root = ET.fromstring(text)
    except ET.ParseError as exc:
        if "<HEDX" in stripped[:4096]:
            raise CorruptFileError(f"malformed or truncated Heyex XML ({exc})", path) from exc
        raise FormatError(f"not well-formed XML ({exc})", path) from exc
    if root.tag != "HEDX":
        raise FormatError(f"root element is <{root.tag}>, expected <HEDX> (not a Heyex XML export)", path)
    body = root.find("BODY")
    if body is None:
        raise FormatError("no <BODY> element below <HEDX> (not a Heyex XML export)", path)
    return body


def _text(element: ET.Element, xpath: str) -> str | None:
    found = element.find(xpath)
    if found is None or found.text is None:
        return None
    value = found.text.strip()
    return value or None


def _float(element: ET.Element, xpath: str, what: str, path: Path) -> float | None:
    value = _text(element, xpath)
    if value is None:
        return None
    try:
        number = float(value)
    except ValueError as exc:
        raise CorruptFileError(f"{what} is {value[:40]!r}, not a number", path) from exc
    if not math.isfinite(number):
        raise CorruptFileError(f"{what} is {value[:40]!r}, not a finite number", path)
    return number


def _int(element: ET.Element, xpath: str, what: str, path: Path) -> int | None:
    value = _text(element, xpath)
    if value is None:
        return None
    try:
        return int(value)
    except ValueError as exc:
        raise CorruptFileError(f"{what} is {value[:40]!r}, not an integer", path) from exc


def _lenient(element: ET.Element, xpath: str, kind: type[int] | type[float]) -> float | int | None:
    """A descriptive number (quality, localizer field): None when absent or unreadable."""
    value = _text(element, xpath)
    try:
        number = kind(value) if value is not None else None
    except ValueError:
        return None
    return number if number is None or math.isfinite(number) else None


def _image_type(image: ET.Element) -> str:
    return (_text(image, "ImageType/Type") or "").upper()


def _oct_series(body: ET.Element, path: Path) -> ET.Element:
    """The one Series that holds OCT images."""
    candidates = [s for s in body.iter("Series") if any(_image_type(i) == "OCT" for i in s.findall("Image"))]
    if not candidates:
        raise UnsupportedFormatError("Heyex XML export holds no OCT B-scans (no Image of ImageType/Type 'OCT')",
                                     path)
    if len(candidates) > 1:
        raise UnsupportedFormatError(
            f"Heyex XML export holds {len(candidates)} OCT series; only single-series exports are supported", path)
    return candidates[0]


def _coord(image: ET.Element, which: str, index: int, path: Path) -> tuple[float, float] | None:
    base = f"OphthalmicAcquisitionContext/{which}/Coord"
    x = _float(image, f"{base}/X", f"{which} X of B-scan {index}", path)
    y = _float(image, f"{base}/Y", f"{which} Y of B-scan {index}", path)
    return None if x is None or y is None else (x, y)


def _scale(image: ET.Element, name: str, index: int, path: Path) -> float:
    value = _float(image, f"OphthalmicAcquisitionContext/{name}", f"{name} of B-scan {index}", path)
    if value is None:
        raise CorruptFileError(f"B-scan {index} has no OphthalmicAcquisitionContext/{name}", path)
    if not 0.0 < value < 1.0:
        raise CorruptFileError(f"implausible {name} {value} mm of B-scan {index} (valid 0..1)", path)
    return value


def _image_name(image: ET.Element, index: int, path: Path) -> str:
    """Last component of ExamURL (Windows path, POSIX path or file:// URL)."""
    url = _text(image, "ImageData/ExamURL")
    if url is None:
        raise CorruptFileError(f"B-scan {index} has no ImageData/ExamURL", path)
    name = re.split(r"[\\/]", url)[-1].strip()
    if name in ("", ".", "..") or "\0" in name:
        raise CorruptFileError(f"ExamURL of B-scan {index} names no file", path)
    return name


class _Folder:
    """Resolve image names in the XML's folder: exact, URL-unquoted, then case-insensitive."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._lower: dict[str, Path] | None = None

    def resolve(self, name: str) -> Path | None:
        for candidate in dict.fromkeys((name, unquote(name))):
            exact = self.folder / candidate
            if exact.is_file():
                return exact
        if self._lower is None:
            self._lower = {}
            for entry in sorted(self.folder.iterdir()):
                if entry.is_file():
                    self._lower.setdefault(entry.name.lower(), entry)
        for candidate in dict.fromkeys((name, unquote(name))):
            found = self._lower.get(candidate.lower())
            if found is not None:
                return found
        return None


def _layer_values(text: str | None, width: int, what: str, path: Path) -> npt.NDArray[np.float32]:
    """One SegLine/Array as float32 row positions; invalid markers -> NaN."""
    tokens = (text or "").split()
    if len(tokens) != width:
        raise CorruptFileError(f"{what} has {len(tokens)} values, the B-scan has {width} A-scans", path)
    try:
        values = np.array([float(t) for t in tokens], dtype=np.float64)
    except ValueError as exc:
        raise CorruptFileError(f"{what} holds a value that is not a number", path) from exc
    bad = ~np.isfinite(values) | (values >= INVALID_FROM) | (values < 0)
    values[bad] = np.nan
    return values.astype(np.float32)


def _circle_like(start: tuple[float, float], end: tuple[float, float], extent_mm: float) -> bool:
    """Whether one B-scan's geometry says circle (End = centre, extent = circumference)."""
    radius = math.dist(start, end)
    if radius <= 1e-9 * max(1.0, extent_mm):
        return True
    circumference = 2.0 * math.pi * radius
    return (abs(extent_mm - circumference) <= _CIRCLE_TOL * extent_mm
            and abs(extent_mm - radius) > _CIRCLE_TOL * extent_mm)


def _scan_pattern(starts: list[tuple[float, float]], ends: list[tuple[float, float]], extent_mm: float) -> str:
    """Classify the scan pattern from the B-scan end points (mm) and lateral extent (mm)."""
    n = len(starts)
    if n == 0:
        return "unknown"
    if all(_circle_like(s, e, extent_mm) for s, e in zip(starts, ends, strict=True)):
        return "circle"
    if n == 1:
        return "line"
    vectors = [(e[0] - s[0], e[1] - s[1]) for s, e in zip(starts, ends, strict=True)]
    lengths = [math.hypot(*v) for v in vectors]
    if min(lengths) <= 1e-9:
        return "unknown"
    dirs = [(v[0] / n_, v[1] / n_) for v, n_ in zip(vectors, lengths, strict=True)]
    d0 = dirs[0]
    if all(abs(d0[0] * d[1] - d0[1] * d[0]) <= _PARALLEL_SIN for d in dirs):
        return "volume"
    mids = [((s[0] + e[0]) / 2.0, (s[1] + e[1]) / 2.0) for s, e in zip(starts, ends, strict=True)]
    centre = (sum(m[0] for m in mids) / n, sum(m[1] for m in mids) / n)
    tol = max(1e-3, 0.05 * sum(lengths) / n)
    if all(math.dist(m, centre) <= tol for m in mids):
        return "radial"
    return "unknown"


def _bscan_order(pattern: str, starts: list[tuple[float, float]]) -> str:
    if pattern == "line":
        return "inferior_first"
    if pattern != "volume" or len(starts) < 2:
        return "unknown"
    first, last = starts[0][1], starts[-1][1]
    if first > last:
        return "inferior_first"
    if first < last:
        return "superior_first"
    return "unknown"


def _laterality(series: ET.Element, first_oct: ET.Element) -> str | None:
    value = (_text(series, "Laterality") or _text(first_oct, "Laterality") or "").upper()
    return {"R": "OD", "OD": "OD", "L": "OS", "OS": "OS"}.get(value)


def _localizer_meta(images: list[ET.Element]) -> dict[str, object]:
    localizers = [i for i in images if _image_type(i) == "LOCALIZER"]
    if not localizers:
        return {"present": False}
    loc = localizers[0]
    ctx = "OphthalmicAcquisitionContext"
    width = _lenient(loc, f"{ctx}/Width", int)
    height = _lenient(loc, f"{ctx}/Height", int)
    scale_x = _lenient(loc, f"{ctx}/ScaleX", float)
    scale_y = _lenient(loc, f"{ctx}/ScaleY", float)
    return {
        "present": True,
        "count": len(localizers),
        "shape": None if width is None or height is None else (height, width),
        "spacing_mm": None if scale_x is None or scale_y is None else (scale_y, scale_x),
        "field_deg": _lenient(loc, f"{ctx}/Angle", float),
        "scan_focus_dpt": _lenient(loc, f"{ctx}/Focus", float),
        "light_source": _text(loc, "ImageType/LightSource"),
    }


# --------------------------------------------------------------------------- reading


def read_heyex_xml(path: str | Path) -> OctVolume:
    """Read a Heidelberg Heyex XML export (the ``.xml`` file and its B-scan images).

    Parameters
    ----------
    path : str or Path
        The export's ``.xml`` file. The B-scan images it names (``ImageData/ExamURL``,
        usually a Windows path) are looked up by their file name in the XML's folder,
        case-insensitively.

    Returns
    -------
    OctVolume
        ``data`` of shape ``(n_oct_images, Height, Width)``, float32, pixel values as
        stored (``intensity="display"``, ``meta["bit_depth"]``); ``spacing_mm`` from
        the B-scan Start points, ScaleY and ScaleX (``spacing_source="file"``);
        ``laterality`` from ``Laterality``; ``layers`` from the SegLine elements
        (NaN = missing); ``vendor="heidelberg"``. ``meta`` holds the B-scan Start
        and End points (mm on the localizer), image qualities, NumImages, the
        localizer's presence, shape and spacing, and the Heyex version. No patient
        field and no file name is returned.

    Raises
    ------
    FileNotFoundError
        ``path`` does not exist.
    FormatError
        Not XML, not a Heyex export (root not ``HEDX`` or no ``BODY``), declares a
        DOCTYPE or ENTITY, or is larger than :data:`MAX_XML_BYTES`.
    CorruptFileError
        The XML is malformed or truncated, a referenced image is missing (the
        message names it), images differ in size or bit depth or disagree with
        Width/Height, ``NumImages`` disagrees with the Image elements, more than
        :data:`MAX_BSCANS` images, a SegLine has the wrong length, or a value is
        missing or not a number.
    UnsupportedFormatError
        The export holds no OCT B-scan, or several OCT series.

    Examples
    --------
    >>> import tempfile
    >>> from octpipe.io.writers.heyex_xml import write_heyex_xml
    >>> xml = write_heyex_xml(tempfile.mkdtemp(), np.zeros((3, 40, 32), np.uint8),
    ...                       spacing_mm=(0.12, 0.0039, 0.0118), laterality="OS")
    >>> vol = read_heyex_xml(xml)
    >>> vol.shape, vol.laterality, vol.scan_pattern
    ((3, 40, 32), 'OS', 'volume')
    """
    path = Path(path)
    body = _parse_root(path)
    series = _oct_series(body, path)
    images = series.findall("Image")
    if len(images) > MAX_BSCANS + 16:
        raise CorruptFileError(f"series holds {len(images)} images (at most {MAX_BSCANS} B-scans supported)", path)
    octs = [i for i in images if _image_type(i) == "OCT"]
    if len(octs) > MAX_BSCANS:
        raise CorruptFileError(f"series holds {len(octs)} OCT B-scans (at most {MAX_BSCANS} supported)", path)
    num_images = _int(series, "NumImages", "NumImages", path)
    if num_images is not None and num_images not in (len(images), len(octs)):
        raise CorruptFileError(
            f"NumImages says {num_images}, the series holds {len(images)} images ({len(octs)} OCT)", path)

    # everything from the XML first, so a bad XML fails before any image is opened
    n = len(octs)
    names = [_image_name(img, i, path) for i, img in enumerate(octs)]
    scale_x = _scale(octs[0], "ScaleX", 0, path)
    scale_y = _scale(octs[0], "ScaleY", 0, path)
    starts = [_coord(img, "Start", i, path) for i, img in enumerate(octs)]
    ends = [_coord(img, "End", i, path) for i, img in enumerate(octs)]
    sizes = [(_int(img, "OphthalmicAcquisitionContext/Height", f"Height of B-scan {i}", path),
              _int(img, "OphthalmicAcquisitionContext/Width", f"Width of B-scan {i}", path))
             for i, img in enumerate(octs)]

    folder = _Folder(path.parent)
    files: list[Path] = []
    for i, name in enumerate(names):
        found = folder.resolve(name)
        if found is None:
            raise CorruptFileError(f"image {name!r} of B-scan {i} is missing from the export's folder", path)
        files.append(found)

    first, depth0, fmt = _read_single(files[0])
    rows, cols = first.shape
    if rows > _MAX_SIZE or cols > _MAX_SIZE:
        raise CorruptFileError(f"B-scan image {cols}x{rows} (WxH) exceeds {_MAX_SIZE} px a side", path)
    data = np.empty((n, rows, cols), dtype=np.float32)
    data[0] = first
    for i in range(n):
        if i:
            frame, depth, _ = _read_single(files[i])
            if frame.shape != first.shape:
                raise CorruptFileError(
                    f"image {names[i]!r} of B-scan {i} is {frame.shape[1]}x{frame.shape[0]} (WxH), "
                    f"B-scan 0 is {cols}x{rows}", path)
            if depth != depth0:
                raise CorruptFileError(f"image {names[i]!r} of B-scan {i} has bit depth {depth}, "
                                       f"B-scan 0 has {depth0}", path)
            data[i] = frame
        height, width = sizes[i]
        if (height is not None and height != rows) or (width is not None and width != cols):
            raise CorruptFileError(f"B-scan {i}: XML says {width}x{height} (WxH), image {names[i]!r} is "
                                   f"{cols}x{rows}", path)

    layers = _read_layers(octs, cols, path)

    have_coords = all(s is not None for s in starts) and all(e is not None for e in ends)
    meta: dict[str, object] = {
        "bit_depth": depth0,
        "image_format": fmt,
        "n_bscans": n,
        "num_images": num_images,
        "heyex_version": _text(body, "SWVersion/Version"),
        "series_type": _text(series, "Type"),
        "bscan_quality": [_lenient(img, "OphthalmicAcquisitionContext/ImageQuality", float) for img in octs],
        "bscan_start_mm": starts,
        "bscan_end_mm": ends,
        "localizer": _localizer_meta(images),
    }
    if have_coords:
        pts_s = [s for s in starts if s is not None]
        pts_e = [e for e in ends if e is not None]
        pattern = _scan_pattern(pts_s, pts_e, cols * scale_x)
        gaps = [math.dist(pts_s[i], pts_s[i + 1]) for i in range(n - 1)]
        distance = float(np.mean(gaps)) if gaps else 0.0
        if gaps:
            meta["bscan_distance_range_mm"] = (min(gaps), max(gaps))
        order = _bscan_order(pattern, pts_s)
        spacing_source = "file"
    else:
        pattern = "volume" if n > 1 else "line"
        distance = DEFAULT_SPACING_MM[0] if n > 1 else 0.0
        order = "unknown"
        spacing_source = "default"
        meta["spacing_note"] = "B-scan Start/End points missing; distance between B-scans is the default"

    sha256 = file_sha256([path, *files])
    provenance, volume_id = make_provenance(path, reader="heyex_xml", format="heyex-xml", sha256=sha256)
    return OctVolume(
        data=data,
        spacing_mm=(distance, scale_y, scale_x),
        spacing_source=spacing_source,
        laterality=_laterality(series, octs[0]),  # type: ignore[arg-type]
        scan_pattern=pattern,
        vendor="heidelberg",
        intensity="display",
        layers=layers,
        volume_id=volume_id,
        provenance=provenance,
        bscan_order=order,
        meta=meta,
    )


def _read_layers(octs: list[ET.Element], cols: int, path: Path) -> dict[str, npt.NDArray[np.float32]]:
    """SegLine boundaries of every B-scan as ``{name: (n_bscans, cols)}``, NaN where missing."""
    layers: dict[str, npt.NDArray[np.float32]] = {}
    for i, img in enumerate(octs):
        seen: set[str] = set()
        for segline in img.findall("Segmentation/SegLine"):
            name = _text(segline, "Name")
            if name is None:
                raise CorruptFileError(f"a SegLine of B-scan {i} has no Name", path)
            if name in seen:
                raise CorruptFileError(f"B-scan {i} holds SegLine {name!r} twice", path)
            seen.add(name)
            array = segline.find("Array")
            values = _layer_values(None if array is None else array.text, cols,
                                   f"SegLine {name!r} of B-scan {i}", path)
            if name not in layers:
                layers[name] = np.full((len(octs), cols), np.nan, dtype=np.float32)
            layers[name][i] = values
    return layers
