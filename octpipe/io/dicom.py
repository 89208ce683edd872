"""DICOM: read Ophthalmic Tomography (OPT) and other greyscale images.

OPT files are written by :mod:`octpipe.io.writers.dicom`.

Reading (:func:`read_dicom`)
    Any DICOM file with pixel data: multi-frame OPT (SOP class
    1.2.840.10008.5.1.4.1.1.77.1.5.4), enhanced or classic multi-frame, or single
    frame. Each frame is one B-scan, rows are the axial direction and columns the
    A-scans, so ``data`` is ``(n_frames, Rows, Columns)``.

    - **Frame order**: by ``InStackPositionNumber`` (Frame Content) when every
      frame has one and all frames belong to one stack; file order otherwise.
    - **Spacing**: ``PixelSpacing`` = (row spacing, column spacing) = (axial,
      lateral) mm, from the Pixel Measures functional group (shared, else the
      first frame's), else the top-level attribute. The B-scan spacing is
      ``SpacingBetweenSlices``, else the median distance between consecutive
      frames' ``ImagePositionPatient``, else ``SliceThickness``. For a single
      frame a missing B-scan spacing is 0. ``spacing_source`` is ``"file"`` when
      everything needed came from the file; otherwise the whole triple is
      :data:`~octpipe.io.images.DEFAULT_SPACING_MM` (Spectralis-like
      (0.12, 0.00387, 0.0113) mm) with ``spacing_source="default"``.
    - **Values**: the stored pixel values as float32, never rescaled to a range;
      only the Modality LUT (``RescaleSlope``/``RescaleIntercept``, top level or
      Pixel Value Transformation functional group) is applied when present.
      ``meta`` records ``bits_stored`` and the stored ``dtype`` so later stages
      know the range. ``MONOCHROME1`` (0 = white) is flipped to the usual sense
      (``max_stored - v``) before the Modality LUT. Colour (RGB, YBR_*) becomes
      grey by BT.601 luminance. ``PALETTE COLOR`` and other interpretations are
      refused. ``intensity`` is ``"display"``.
    - **Laterality**: ``ImageLaterality``, else ``Laterality``, else the Frame
      Anatomy ``FrameLaterality``; R -> OD, L -> OS, anything else None.
    - **Privacy**: nothing identifying is copied. ``meta`` holds only
      ``modality``, ``sop_class`` (its name), ``manufacturer_model_name``,
      ``bits_stored``, ``photometric_interpretation``, ``n_frames``, ``dtype``
      and, when a Modality LUT was applied, ``rescale_slope``/``rescale_intercept``.
      ``vendor`` is a fixed token (``"heidelberg"``, ``"zeiss"``, ...) derived from
      ``Manufacturer``, or ``"unknown"``.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import BytesLengthException, InvalidDicomError
from pydicom.sequence import Sequence
from pydicom.uid import UID

from octpipe.errors import CorruptFileError, FormatError, OctpipeError, UnsupportedFormatError
from octpipe.io._common import BoundedReader, make_provenance
from octpipe.io.images import DEFAULT_SPACING_MM, _luminance
from octpipe.volume import OctVolume

__all__ = ["read_dicom", "OPT_SOP_CLASS_UID"]

#: Ophthalmic Tomography Image Storage.
OPT_SOP_CLASS_UID = "1.2.840.10008.5.1.4.1.1.77.1.5.4"

#: Substrings of ``Manufacturer`` (lower case) and the vendor token they map to.
_VENDORS = (
    ("heidelberg", "heidelberg"),
    ("zeiss", "zeiss"),
    ("topcon", "topcon"),
    ("optovue", "optovue"),
    ("visionix", "optovue"),
    ("nidek", "nidek"),
    ("canon", "canon"),
    ("bioptigen", "bioptigen"),
    ("leica", "leica"),
    ("optopol", "optopol"),
    ("tomey", "tomey"),
)
_DICOM_TO_LATERALITY = {"R": "OD", "L": "OS"}
_SUPPORTED_PHOTOMETRIC = (
    "MONOCHROME1", "MONOCHROME2", "RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "YBR_PARTIAL_420",
)
#: Largest decoded volume read_dicom will allocate (float32 bytes); above it the header is taken as corrupt.
_MAX_VOLUME_BYTES = 1 << 35  # 32 GiB



# --------------------------------------------------------------------------- reading


def _float(value: Any) -> float | None:
    """Convert a header value to a finite float, or None."""
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if np.isfinite(out) else None


def _first_item(ds: Dataset | None, keyword: str) -> Dataset | None:
    """First item of sequence ``keyword`` in ``ds``, or None."""
    if ds is None:
        return None
    seq = ds.get(keyword)
    if seq is None or not isinstance(seq, Sequence) or len(seq) == 0:
        return None
    return seq[0]


def _functional(ds: Dataset, frame: Dataset | None, keyword: str) -> Dataset | None:
    """Functional-group macro ``keyword`` for a frame: per-frame first, then shared."""
    item = _first_item(frame, keyword)
    if item is None:
        item = _first_item(_first_item(ds, "SharedFunctionalGroupsSequence"), keyword)
    return item


def _int_attr(ds: Dataset, keyword: str, default: int | None, path: Path) -> int:
    value = ds.get(keyword, default)
    try:
        out = int(value) if value not in (None, "") else default
    except (TypeError, ValueError):
        out = None
    if out is None:
        raise CorruptFileError(f"{keyword} is missing or not a number ({value!r})", path)
    return out


def _check_pixel_size(ds: Dataset, path: Path, rows: int, cols: int, frames: int, spp: int, bits: int) -> None:
    """Refuse a header whose image size does not fit the stored pixel data (before decoding)."""
    if rows < 1 or cols < 1 or frames < 1 or spp not in (1, 3, 4) or bits not in (1, 8, 16, 32, 64):
        raise CorruptFileError(
            f"implausible image header: Rows={rows}, Columns={cols}, NumberOfFrames={frames}, "
            f"SamplesPerPixel={spp}, BitsAllocated={bits}", path)
    if rows * cols * frames * 4 > _MAX_VOLUME_BYTES:
        raise CorruptFileError(
            f"header says {frames} frames of {rows}x{cols} pixels, over {_MAX_VOLUME_BYTES >> 30} GiB", path)
    stored = ds["PixelData"].value
    n_stored = len(stored) if stored is not None else 0
    syntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if syntax is not None and UID(syntax).is_encapsulated:
        n_fragments = 0
        if n_stored >= 8 and stored[:4] == b"\xfe\xff\x00\xe0":
            (bot_len,) = struct.unpack("<I", stored[4:8])
            try:
                n_fragments, _ = pydicom.encaps.parse_fragments(stored[8 + bot_len:])
            except (ValueError, struct.error) as exc:
                raise CorruptFileError(f"encapsulated pixel data is damaged: {exc}", path) from exc
        if n_fragments < frames:
            raise CorruptFileError(
                f"header says {frames} frames but the encapsulated pixel data holds {n_fragments} fragments", path)
        return
    samples = 2 if str(ds.get("PhotometricInterpretation", "")) == "YBR_FULL_422" else spp
    expected = (rows * cols * frames * samples * bits + 7) // 8
    if n_stored < expected:
        raise CorruptFileError(
            f"header says {frames} frames of {rows}x{cols} pixels ({expected} bytes) but the pixel data "
            f"holds {n_stored} bytes (truncated?)", path)


def _spacing(ds: Dataset, frames: list[Dataset | None], n_frames: int) -> tuple[tuple[float, float, float], str]:
    """Spacing (between B-scans, axial, lateral) and its source; see the module docstring."""
    measures = _functional(ds, frames[0], "PixelMeasuresSequence")
    holders = [h for h in (measures, ds) if h is not None]

    in_plane = None
    for holder in holders:
        pixel_spacing = holder.get("PixelSpacing")
        if pixel_spacing is not None and not isinstance(pixel_spacing, str):
            try:
                values = [_float(v) for v in pixel_spacing]
            except TypeError:
                values = []
            if len(values) == 2 and all(v is not None and v > 0 for v in values):
                in_plane = (values[0], values[1])
                break

    between = None
    for holder in holders:
        value = _float(holder.get("SpacingBetweenSlices"))
        if value is not None and value > 0:
            between = value
            break
    if between is None and n_frames > 1:
        positions = []
        for frame in frames:
            plane = _functional(ds, frame, "PlanePositionSequence")
            ipp = plane.get("ImagePositionPatient") if plane is not None else None
            try:
                vals = [_float(v) for v in ipp] if ipp is not None and len(ipp) == 3 else None
            except TypeError:  # a single value instead of three
                vals = None
            if vals is None or any(v is None for v in vals):
                positions = []
                break
            positions.append(vals)
        if positions:
            steps = np.linalg.norm(np.diff(np.asarray(positions, dtype=np.float64), axis=0), axis=1)
            step = float(np.median(steps))
            if np.isfinite(step) and step > 0:
                between = step
    if between is None:
        for holder in holders:
            value = _float(holder.get("SliceThickness"))
            if value is not None and value > 0:
                between = value
                break
    if between is None and n_frames == 1:
        between = 0.0
    if in_plane is None or between is None:
        return DEFAULT_SPACING_MM, "default"
    return (between, in_plane[0], in_plane[1]), "file"


def _frame_order(frames: list[Dataset | None]) -> list[int]:
    """Frame indices sorted by InStackPositionNumber when all frames have one, in one stack."""
    positions = []
    stacks = set()
    for frame in frames:
        content = _first_item(frame, "FrameContentSequence")
        pos = _float(content.get("InStackPositionNumber")) if content is not None else None
        if pos is None:
            return list(range(len(frames)))
        positions.append(pos)
        stacks.add(str(content.get("StackID", "")))
    if len(stacks) > 1:
        return list(range(len(frames)))
    return [int(i) for i in np.argsort(np.asarray(positions), kind="stable")]


def _rescale(ds: Dataset, frame: Dataset | None) -> tuple[float, float]:
    """(slope, intercept) of the Modality LUT for one frame; (1, 0) when absent."""
    transform = _functional(ds, frame, "PixelValueTransformationSequence")
    for holder in (transform, ds):
        if holder is None:
            continue
        slope, intercept = _float(holder.get("RescaleSlope")), _float(holder.get("RescaleIntercept"))
        if slope is not None or intercept is not None:
            return (1.0 if slope is None else slope), (0.0 if intercept is None else intercept)
    return 1.0, 0.0


def _vendor(manufacturer: str) -> str:
    text = manufacturer.lower()
    for needle, token in _VENDORS:
        if needle in text:
            return token
    return "unknown"


def _laterality(ds: Dataset, frame: Dataset | None) -> str | None:
    anatomy = _functional(ds, frame, "FrameAnatomySequence")
    for value in (ds.get("ImageLaterality"), ds.get("Laterality"),
                  anatomy.get("FrameLaterality") if anatomy is not None else None):
        if value:
            return _DICOM_TO_LATERALITY.get(str(value).strip().upper())
    return None


def _text(value: Any) -> str | None:
    return None if value in (None, "") else str(value)


def read_dicom(path: str | Path) -> OctVolume:
    """Read a DICOM image (OPT or any greyscale/colour image) as an :class:`OctVolume`.

    Parameters
    ----------
    path : str or Path
        A DICOM Part 10 file (with the 128-byte preamble and ``DICM`` marker).

    Returns
    -------
    OctVolume
        ``data`` of shape ``(n_frames, Rows, Columns)``, float32, the stored values
        (Modality LUT applied when present); spacing, laterality and vendor as in
        the module docstring; ``scan_pattern`` ``"volume"`` for more than one
        frame, else ``"line"``; ``intensity="display"``; provenance format
        ``"dicom-opt"`` for OPT files, else ``"dicom"``. No identifying attribute
        is copied.

    Raises
    ------
    FileNotFoundError
        ``path`` does not exist.
    FormatError
        The file is not DICOM.
    CorruptFileError
        The file is truncated, has no pixel data, or its Rows/Columns/NumberOfFrames
        do not fit the stored pixel data.
    UnsupportedFormatError
        The photometric interpretation or transfer syntax cannot be decoded.

    Examples
    --------
    >>> import tempfile
    >>> from octpipe.io.writers.dicom import write_dicom_opt
    >>> p = write_dicom_opt(tempfile.mkdtemp() + "/v.dcm", np.ones((2, 16, 8), np.uint16),
    ...                     spacing_mm=(0.2, 0.004, 0.01), laterality="OS", patient_id="anon")
    >>> v = read_dicom(p)
    >>> v.shape, v.laterality, v.spacing_source
    ((2, 16, 8), 'OS', 'file')
    """
    path = Path(path)
    if path.is_dir():
        raise FormatError("is a folder, not a DICOM file", path)
    try:
        # BoundedReader: a damaged length field must not make pydicom allocate more than the file holds
        with BoundedReader(path) as fh:
            ds = pydicom.dcmread(fh)
    except InvalidDicomError as exc:
        raise FormatError(f"not a DICOM file ({exc})", path) from exc
    except FileNotFoundError:
        raise
    except (EOFError, OSError, ValueError, KeyError, TypeError, struct.error, NotImplementedError, OverflowError,
            MemoryError, BytesLengthException) as exc:
        raise CorruptFileError(f"cannot parse the DICOM data set (truncated?): {_one_line(exc)}", path) from exc
    try:
        return _volume_from_dataset(ds, path)
    except OctpipeError:
        raise
    except (NotImplementedError, ValueError, KeyError, TypeError, AttributeError, IndexError, OverflowError,
            struct.error, EOFError, MemoryError, BytesLengthException) as exc:
        # attributes are decoded lazily: a damaged VR or value fails here, not in dcmread
        raise CorruptFileError(f"damaged DICOM attribute: {_one_line(exc)}", path) from exc


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200] if text else ''}"


def _volume_from_dataset(ds: Dataset, path: Path) -> OctVolume:
    """The body of :func:`read_dicom` once the data set is parsed."""
    if "PixelData" not in ds:
        other = [k for k in ("FloatPixelData", "DoubleFloatPixelData") if k in ds]
        if other:
            raise UnsupportedFormatError(f"{other[0]} (float pixel data) is not supported", path)
        raise CorruptFileError("no pixel data (not an image, or the file is truncated)", path)
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    if photometric not in _SUPPORTED_PHOTOMETRIC:
        raise UnsupportedFormatError(f"photometric interpretation {photometric or '(missing)'!r} is not supported",
                                     path)
    rows = _int_attr(ds, "Rows", None, path)
    cols = _int_attr(ds, "Columns", None, path)
    n_frames = _int_attr(ds, "NumberOfFrames", 1, path)
    spp = _int_attr(ds, "SamplesPerPixel", 1, path)
    bits_alloc = _int_attr(ds, "BitsAllocated", None, path)
    bits_stored = _int_attr(ds, "BitsStored", bits_alloc, path)
    _check_pixel_size(ds, path, rows, cols, n_frames, spp, bits_alloc)

    try:
        pixels = ds.pixel_array
    except (NotImplementedError, RuntimeError, ImportError) as exc:
        syntax = ds.file_meta.get("TransferSyntaxUID", "unknown")
        raise UnsupportedFormatError(f"cannot decode pixel data ({UID(syntax).name}): {exc}", path) from exc
    except (ValueError, EOFError, struct.error, TypeError, AttributeError) as exc:
        raise CorruptFileError(f"cannot decode pixel data: {exc}", path) from exc

    stored_dtype = str(pixels.dtype)
    colour = spp > 1
    try:
        pixels = pixels.reshape((n_frames, rows, cols, spp) if colour else (n_frames, rows, cols))
    except ValueError as exc:
        raise CorruptFileError(
            f"decoded pixels of shape {pixels.shape} do not fit {n_frames} frames of {rows}x{cols}x{spp}", path
        ) from exc
    if colour:
        data = _luminance(pixels)
    else:
        data = pixels.astype(np.float32)  # a new array: the in-place steps below touch nothing else
        if photometric == "MONOCHROME1":  # 0 = white: flip to the MONOCHROME2 sense
            top = -1.0 if int(ds.get("PixelRepresentation", 0)) == 1 else float((1 << bits_stored) - 1)
            np.subtract(np.float32(top), data, out=data)

    per_frame_seq = ds.get("PerFrameFunctionalGroupsSequence")
    frames: list[Dataset | None] = (
        list(per_frame_seq) if isinstance(per_frame_seq, Sequence) and len(per_frame_seq) == n_frames
        else [None] * n_frames
    )
    rescale = None
    if not colour:
        factors = [_rescale(ds, f) for f in frames]
        if any(f != (1.0, 0.0) for f in factors):
            with np.errstate(all="ignore"):  # a damaged slope gives inf/NaN, marked invalid below
                for i, (slope, intercept) in enumerate(factors):
                    data[i] *= np.float32(slope)
                    data[i] += np.float32(intercept)
            rescale = factors[0] if len(set(factors)) == 1 else ("per-frame", "per-frame")

    order = _frame_order(frames)
    if order != list(range(n_frames)):
        data = data[order]
        frames = [frames[i] for i in order]
    spacing, source = _spacing(ds, frames, n_frames)

    sop_class = ds.get("SOPClassUID")
    is_opt = sop_class is not None and str(sop_class) == OPT_SOP_CLASS_UID
    meta: dict[str, object] = {
        "modality": _text(ds.get("Modality")),
        "sop_class": UID(str(sop_class)).name if sop_class else None,
        "manufacturer_model_name": _text(ds.get("ManufacturerModelName")),
        "bits_stored": bits_stored,
        "photometric_interpretation": photometric,
        "n_frames": n_frames,
        "dtype": stored_dtype,
    }
    if rescale is not None:
        meta["rescale_slope"], meta["rescale_intercept"] = rescale
    prov, vid = make_provenance(path, reader="dicom", format="dicom-opt" if is_opt else "dicom")
    data = np.ascontiguousarray(data, dtype=np.float32)
    invalid = ~np.isfinite(data)  # a damaged rescale slope/intercept (NaN, overflow)
    if invalid.any():
        data[invalid] = 0.0
    return OctVolume(
        data=data,
        invalid=invalid if invalid.any() else None,
        spacing_mm=spacing,
        spacing_source=source,
        laterality=_laterality(ds, frames[0]),  # type: ignore[arg-type]
        scan_pattern="volume" if n_frames > 1 else "line",
        vendor=_vendor(str(ds.get("Manufacturer", "") or "")),
        intensity="display",
        volume_id=vid,
        provenance=prov,
        meta=meta,
    )
