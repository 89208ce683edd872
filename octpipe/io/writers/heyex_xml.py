"""Write Heidelberg Heyex XML exports: ``export.xml``, one image per B-scan and a localizer.

A small export in the layout that :func:`octpipe.io.heyex_xml.read_heyex_xml` reads (its module
docstring lists the elements), for tests and phantoms; ``eyepy.import_heyex_xml`` reads it too.
The Patient element holds placeholders unless a privacy test gives real-looking values.
"""

from __future__ import annotations

import math
import re
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from datetime import date
from pathlib import Path
from typing import Literal

import numpy as np
import numpy.typing as npt

from octpipe.errors import OctpipeError
from octpipe.io._common import atomic_output, check_uint8_volume, check_writable
from octpipe.io._heyex import HEYEX_LAYER_NAMES
from octpipe.io.heyex_xml import _MAX_SIZE, MAX_BSCANS

__all__ = ["write_heyex_xml"]

_HEYEX_NONE = "3e+038"  # how Heyex writes "no boundary here"
_LOCALIZER_FIELD_MM = 8.64  # 30 degrees at ~0.288 mm/degree
_LOCALIZER_PX = 256
_PATIENT_KEYS = ("LastName", "FirstNames", "BirthDate", "PatientID")
_PLACEHOLDER_PATIENT = {"LastName": "Pseudonym", "FirstNames": "Anonymous", "BirthDate": "1900-01-01",
                        "PatientID": "PSEUDO-0001"}


def _sub(parent: ET.Element, tag: str, text: object = None) -> ET.Element:
    element = ET.SubElement(parent, tag)
    if text is not None:
        element.text = str(text)
    return element


def _coord_element(parent: ET.Element, tag: str, xy: tuple[float, float]) -> None:
    coord = _sub(_sub(parent, tag), "Coord")
    _sub(coord, "X", repr(float(xy[0])))
    _sub(coord, "Y", repr(float(xy[1])))


def _date_parts(value: object) -> tuple[int, int, int]:
    if isinstance(value, date):
        return value.year, value.month, value.day
    text = str(value)
    match = re.fullmatch(r"(\d{4})-(\d{2})-(\d{2})", text)
    if not match:
        raise ValueError(f"patient BirthDate must be a date or 'YYYY-MM-DD', got {text!r}")
    year, month, day = (int(g) for g in match.groups())
    date(year, month, day)  # validates
    return year, month, day


def _layer_text(row: npt.NDArray[np.float32]) -> str:
    return " ".join(_HEYEX_NONE if not np.isfinite(v) else str(v) for v in row)


def _save_image(target: Path, image: npt.NDArray[np.uint8], image_format: str) -> None:
    with atomic_output(target) as tmp:
        if image_format == "png":
            from PIL import Image

            Image.fromarray(np.ascontiguousarray(image)).save(tmp, format="PNG")
        else:
            import tifffile

            tifffile.imwrite(tmp, np.ascontiguousarray(image), photometric="minisblack")


def _synthetic_localizer() -> npt.NDArray[np.uint8]:
    yy, xx = np.mgrid[0:_LOCALIZER_PX, 0:_LOCALIZER_PX].astype(np.float32)
    r = np.hypot(yy - _LOCALIZER_PX / 2, xx - _LOCALIZER_PX * 0.35) / _LOCALIZER_PX
    return np.clip(60 + 120 * np.exp(-(r / 0.35) ** 2), 0, 255).astype(np.uint8)


def write_heyex_xml(
    folder: str | Path,
    data_uint8: npt.NDArray[np.uint8],
    *,
    spacing_mm: tuple[float, float, float],
    laterality: str,
    layers: Mapping[str, npt.ArrayLike] | None = None,
    patient: Mapping[str, object] | None = None,
    overwrite: bool = False,
    image_format: Literal["png", "tif"] = "png",
) -> Path:
    r"""Write a Heyex-style XML export: ``export.xml``, one image per B-scan and a localizer.

    B-scans are laid out as a horizontal raster centred on a synthetic 256 x 256
    localizer spanning 8.64 mm (30 degrees), B-scan 0 at the bottom (largest y,
    inferior first) as Spectralis does. ExamURLs are Windows paths
    (``C:\HEYEX\Export\bscan_000.png``) so readers must resolve them by name.
    The images are written first, then the XML, each under a temporary name that is
    renamed into place.

    Parameters
    ----------
    folder : str or Path
        Output folder; created when missing.
    data_uint8 : ndarray of uint8, shape (n_bscans, n_axial, n_ascans)
        The B-scans. Other dtypes are refused (no silent rescaling).
    spacing_mm : tuple of 3 floats
        (between B-scans, axial, lateral) in mm; axial and lateral in (0, 1), the
        distance > 0 when there is more than one B-scan.
    laterality : {"OD", "OS"}
        Examined eye, written as ``R`` / ``L``.
    layers : mapping of str to array_like, shape (n_bscans, n_ascans), optional
        Boundary row positions by Heyex name (``"ILM"``, ``"BM"``, ...); NaN is
        written as Heyex's ``3e+038`` (none). Default: no Segmentation.
    patient : mapping, optional
        Identifying fields written into the Patient element: ``LastName``,
        ``FirstNames``, ``BirthDate`` (``date`` or ``"YYYY-MM-DD"``) and
        ``PatientID``. Missing keys get pseudonymous placeholders; the reader never
        returns them (privacy tests write real-looking values here).
    overwrite : bool
        Replace an existing ``export.xml`` (and images of the same names).
    image_format : {"png", "tif"}
        B-scan image files: ``bscan_000.png``, ... (8-bit PNG) or ``.tif`` (8-bit TIFF).

    Returns
    -------
    Path
        The written ``export.xml``.

    Raises
    ------
    ValueError
        An argument is out of range (dtype, shape, spacing, laterality, layer name
        or shape, patient key or birth date, image format).
    OctpipeError
        ``export.xml`` exists and ``overwrite`` is false, or ``folder`` is a file.

    Examples
    --------
    >>> import tempfile
    >>> xml = write_heyex_xml(tempfile.mkdtemp(), np.zeros((2, 16, 8), np.uint8),
    ...                       spacing_mm=(0.12, 0.0039, 0.0118), laterality="OD")
    >>> xml.name, sorted(p.name for p in xml.parent.glob("bscan_*"))
    ('export.xml', ['bscan_000.png', 'bscan_001.png'])
    """
    check_uint8_volume(data_uint8)
    n, rows, cols = data_uint8.shape
    if n > MAX_BSCANS or rows > _MAX_SIZE or cols > _MAX_SIZE:
        raise ValueError(f"data_uint8 shape {data_uint8.shape} out of range (1..{MAX_BSCANS}, 1..{_MAX_SIZE}, "
                         f"1..{_MAX_SIZE})")
    if len(spacing_mm) != 3:
        raise ValueError(f"spacing_mm must be 3 values (between B-scans, axial, lateral), got {spacing_mm}")
    distance, scale_y, scale_x = (float(s) for s in spacing_mm)
    if not (math.isfinite(distance) and 0.0 <= distance < 100.0 and 0.0 < scale_y < 1.0 and 0.0 < scale_x < 1.0):
        raise ValueError(f"spacing_mm must be finite, distance in [0, 100) and axial, lateral in (0, 1), "
                         f"got {spacing_mm}")
    if n > 1 and distance <= 0.0:
        raise ValueError(f"spacing_mm[0] (between B-scans) must be > 0 for {n} B-scans, got {distance}")
    if laterality not in ("OD", "OS"):
        raise ValueError(f"laterality must be 'OD' or 'OS', got {laterality!r}")
    if image_format not in ("png", "tif"):
        raise ValueError(f"image_format must be 'png' or 'tif', got {image_format!r}")
    rows_by_layer: dict[str, npt.NDArray[np.float32]] = {}
    for name, values in (layers or {}).items():
        if name not in HEYEX_LAYER_NAMES:
            raise ValueError(f"unknown layer name {name!r}; valid: {list(HEYEX_LAYER_NAMES)}")
        arr = np.asarray(values, dtype=np.float32)
        if arr.shape != (n, cols):
            raise ValueError(f"layer {name!r} must have shape {(n, cols)}, got {arr.shape}")
        rows_by_layer[name] = arr
    fields: dict[str, object] = dict(_PLACEHOLDER_PATIENT)
    if patient is not None:
        unknown = sorted(set(patient) - set(_PATIENT_KEYS))
        if unknown:
            raise ValueError(f"unknown patient keys {unknown}; valid: {list(_PATIENT_KEYS)}")
        fields.update(patient)
    birth = _date_parts(fields["BirthDate"])

    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise OctpipeError("output exists and is not a folder", folder)
    target = check_writable(folder / "export.xml", overwrite=overwrite)

    root = ET.Element("HEDX")
    body = _sub(root, "BODY")
    _sub(body, "ExportType", "Data")
    sw = _sub(body, "SWVersion")
    _sub(sw, "Name", "octpipe heyex_xml writer")
    _sub(sw, "Version", "6.9.53.0")
    pat = _sub(body, "Patient")
    _sub(pat, "ID", "1")
    _sub(pat, "PatientID", fields["PatientID"])
    _sub(pat, "LastName", fields["LastName"])
    _sub(pat, "FirstNames", fields["FirstNames"])
    bdate = _sub(_sub(pat, "Birthdate"), "Date")
    for tag, value in zip(("Year", "Month", "Day"), birth, strict=True):
        _sub(bdate, tag, f"{value:02d}")
    study = _sub(pat, "Study")
    _sub(study, "ID", "1")
    series = _sub(study, "Series")
    _sub(series, "ID", "1")
    _sub(series, "Modality", "OCT")
    _sub(series, "Type", "Volume" if n > 1 else "Line")
    _sub(series, "Laterality", "R" if laterality == "OD" else "L")
    equipment = _sub(series, "GeneralEquipment")
    _sub(equipment, "Manufacturer", "Heidelberg Engineering")
    _sub(equipment, "ManufacturerModelName", "Spectralis")
    _sub(series, "NumImages", n + 1)

    lat_code = "R" if laterality == "OD" else "L"
    loc_scale = _LOCALIZER_FIELD_MM / _LOCALIZER_PX
    loc = _sub(series, "Image")
    _sub(loc, "ID", 0)
    _sub(loc, "ImageNumber", 0)
    _sub(loc, "Laterality", lat_code)
    loc_type = _sub(loc, "ImageType")
    _sub(loc_type, "Type", "LOCALIZER")
    _sub(loc_type, "LightSource", "IR")
    ctx = _sub(loc, "OphthalmicAcquisitionContext")
    for tag, value in (("Width", _LOCALIZER_PX), ("Height", _LOCALIZER_PX), ("ScaleX", repr(loc_scale)),
                       ("ScaleY", repr(loc_scale)), ("Angle", 30), ("Focus", "0.00")):
        _sub(ctx, tag, value)
    loc_name = f"localizer.{image_format}"
    loc_data = _sub(loc, "ImageData")
    _sub(loc_data, "Extension", image_format.upper())
    _sub(loc_data, "ExamURL", f"C:\\HEYEX\\Export\\{loc_name}")

    centre = _LOCALIZER_FIELD_MM / 2.0
    length = cols * scale_x
    width_digits = max(3, len(str(n - 1)))
    names = [f"bscan_{i:0{width_digits}d}.{image_format}" for i in range(n)]
    for i in range(n):
        y = centre + (n - 1) / 2.0 * distance - i * distance
        img = _sub(series, "Image")
        _sub(img, "ID", i + 1)
        _sub(img, "ImageNumber", i + 1)
        _sub(img, "Laterality", lat_code)
        _sub(_sub(img, "ImageType"), "Type", "OCT")
        ctx = _sub(img, "OphthalmicAcquisitionContext")
        _sub(ctx, "Width", cols)
        _sub(ctx, "Height", rows)
        _sub(ctx, "ScaleX", repr(scale_x))
        _sub(ctx, "ScaleY", repr(scale_y))
        _sub(ctx, "ImageQuality", "30.00")
        _coord_element(ctx, "Start", (centre - length / 2.0, y))
        _coord_element(ctx, "End", (centre + length / 2.0, y))
        image_data = _sub(img, "ImageData")
        _sub(image_data, "Extension", image_format.upper())
        _sub(image_data, "ExamURL", f"C:\\HEYEX\\Export\\{names[i]}")
        if rows_by_layer:
            seg = _sub(img, "Segmentation")
            _sub(seg, "NumSegmentations", len(rows_by_layer))
            for name, values in rows_by_layer.items():
                line = _sub(seg, "SegLine")
                _sub(line, "Name", name)
                _sub(line, "Enabled", "true")
                _sub(line, "Manual", "false")
                array = _sub(line, "Array", _layer_text(values[i]))
                array.set("n", str(cols))
                array.set("type", "real")
    ET.indent(root)

    _save_image(folder / loc_name, _synthetic_localizer(), image_format)
    for i, name in enumerate(names):
        _save_image(folder / name, data_uint8[i], image_format)
    with atomic_output(target) as tmp, open(tmp, "wb") as fh:
        ET.ElementTree(root).write(fh, encoding="utf-8", xml_declaration=True)
    return target
