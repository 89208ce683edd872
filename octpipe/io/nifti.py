"""NIfTI-1: write volumes for research tools, read them (and foreign NIfTI) back.

Axis convention (octpipe files)
    An octpipe volume is ``(n_bscans, n_axial, n_ascans)`` = (z, y, x). In the
    NIfTI file it is stored transposed to ``(n_ascans, n_bscans, n_axial)``, so the
    voxel axes are

    ============  ======================  ===============================
    voxel axis    octpipe axis            world axis of the affine
    ============  ======================  ===============================
    i             x, A-scan (lateral)     +x (R), step = lateral mm
    j             z, B-scan (slow axis)   +y (A), step = B-scan spacing mm
    k             y, depth (axial)        -z (S), step = axial mm
    ============  ======================  ===============================

    i.e. the affine (:func:`nifti_affine`) is ``diag(lateral, bscan, -axial, 1)``
    with voxel (0, 0, 0) at the origin. Depth runs towards -z, so in a RAS viewer
    (ITK-SNAP, 3D Slicer, FSLeyes) a coronal slice is a B-scan shown the usual way
    up (vitreous on top), an axial slice is an en-face image, and distances are in
    mm. The header's zooms (pixdim) are therefore ``(lateral, bscan, axial)``, i.e.
    ``spacing_mm`` permuted by ``(2, 0, 1)``. The position of the scan in the eye
    is not known, so the world frame is nominal. qform (code 1, scanner) and sform
    (code 2, aligned) both hold the affine; xyzt units are mm. Data are float32.
    ``intent_name`` is ``"octpipe-xzy"`` to mark the convention; ``descrip``
    holds the caller's description. NIfTI has no laterality field: keep it in a
    side-car if needed.

Reading
    Files marked ``octpipe-xzy`` are inverted exactly. Any other 3-D NIfTI is
    interpreted with the same *index* convention (i = A-scan, j = B-scan,
    k = depth with k = 0 the top row of each B-scan); the affine's direction and
    origin are ignored and only its column norms give the spacing. A 2-D image is
    one B-scan with i = A-scan and j = depth. Trailing axes of length 1 (e.g. a
    4-D file with one time point) are dropped; real 4-D+ data are refused.
    Spacing comes from the affine's column norms (``spacing_source="file"``); a
    zero or non-finite norm makes the whole triple the default (Spectralis-like)
    with ``spacing_source="default"``. The B-scan spacing of a 2-D image is 0.
    Laterality is None and ``intensity`` is ``"display"``; values keep the file's
    scaling (``scl_slope``/``scl_inter`` applied), as float32.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import numpy.typing as npt
from nibabel.filebasedimages import ImageFileError
from nibabel.openers import ImageOpener
from nibabel.spatialimages import HeaderDataError

from octpipe.errors import CorruptFileError, FormatError, UnsupportedFormatError
from octpipe.io._common import DEFLATE_MAX_RATIO, atomic_output, check_writable, file_sha256, make_provenance
from octpipe.io.images import DEFAULT_SPACING_MM
from octpipe.volume import OctVolume

__all__ = ["write_nifti", "read_nifti", "nifti_affine", "OCTPIPE_INTENT_NAME"]

#: ``intent_name`` written by :func:`write_nifti` to mark the octpipe axis convention.
OCTPIPE_INTENT_NAME = "octpipe-xzy"
#: Largest volume read_nifti will decode (float32 bytes); a larger header is taken as corrupt.
_MAX_VOLUME_BYTES = 1 << 35  # 32 GiB
#: Volume axes (z, y, x) -> file axes (i, j, k) = (x, z, y).
_TO_FILE = (2, 0, 1)
#: File axes (i, j, k) = (x, z, y) -> volume axes (z, y, x).
_FROM_FILE = (1, 2, 0)


def _check_spacing(spacing_mm: tuple[float, float, float]) -> tuple[float, float, float]:
    spacing = tuple(float(s) for s in spacing_mm)
    if len(spacing) != 3 or not all(np.isfinite(s) and s > 0 for s in spacing):
        raise ValueError(f"spacing_mm must be 3 finite values > 0 (mm), got {spacing_mm}")
    return spacing  # type: ignore[return-value]


def nifti_affine(shape: tuple[int, int, int], spacing_mm: tuple[float, float, float]) -> npt.NDArray[np.float64]:
    """Return the voxel-to-mm affine that :func:`write_nifti` uses for a volume.

    Parameters
    ----------
    shape : tuple of 3 ints
        The octpipe volume shape ``(n_bscans, n_axial, n_ascans)`` (checked, not
        otherwise used: the affine does not depend on it).
    spacing_mm : tuple of 3 floats
        (between B-scans, axial, lateral) in mm, each > 0.

    Returns
    -------
    ndarray of float64, shape (4, 4)
        ``diag(lateral, bscan, -axial, 1)``: file voxel (i, j, k) = (A-scan,
        B-scan, depth) to world mm; see the module docstring.

    Raises
    ------
    ValueError
        ``shape`` is not 3 positive ints or a spacing is not finite and > 0.

    Examples
    --------
    >>> nifti_affine((3, 40, 32), (0.12, 0.004, 0.01)).diagonal().tolist()
    [0.01, 0.12, -0.004, 1.0]
    """
    if len(shape) != 3 or not all(int(n) >= 1 for n in shape):
        raise ValueError(f"shape must be 3 positive ints (n_bscans, n_axial, n_ascans), got {shape}")
    bscan, axial, lateral = _check_spacing(spacing_mm)
    return np.diag([lateral, bscan, -axial, 1.0])


def write_nifti(
    path: str | Path,
    data: npt.ArrayLike,
    *,
    spacing_mm: tuple[float, float, float],
    overwrite: bool = False,
    description: str = "",
) -> Path:
    """Write a volume as NIfTI-1 (``.nii`` or ``.nii.gz``) with the octpipe axis convention.

    Parameters
    ----------
    path : str or Path
        Output file; must end in ``.nii`` or ``.nii.gz`` (gzip-compressed).
    data : array_like, shape (n_bscans, n_axial, n_ascans)
        Real-valued volume; stored as float32 (values unchanged, no rescaling).
    spacing_mm : tuple of 3 floats
        (between B-scans, axial, lateral) in mm, each > 0.
    overwrite : bool
        Replace an existing file.
    description : str
        Free text for the header's ``descrip`` field (ASCII, at most 80 characters).

    Returns
    -------
    Path
        The written file (written to a temporary file, then renamed into place).

    Raises
    ------
    ValueError
        ``data`` is not a non-empty 3-D real array, the suffix is wrong, a spacing
        is out of range or ``description`` is too long / not ASCII.
    OctpipeError
        ``path`` exists and ``overwrite`` is false.

    Examples
    --------
    >>> import tempfile
    >>> p = write_nifti(tempfile.mkdtemp() + "/v.nii.gz", np.zeros((3, 40, 32)), spacing_mm=(0.12, 0.004, 0.01))
    >>> nib.load(p).header.get_zooms()
    (np.float32(0.01), np.float32(0.12), np.float32(0.004))
    """
    arr = np.asarray(data)
    if arr.dtype.kind not in "uif":
        raise ValueError(f"data must be real-valued (int, uint or float), got {arr.dtype}")
    if arr.ndim != 3 or min(arr.shape) < 1:
        raise ValueError(f"data must be 3-D (n_bscans, n_axial, n_ascans) and non-empty, got shape {arr.shape}")
    name = Path(path).name
    if not (name.endswith(".nii") or name.endswith(".nii.gz")):
        raise ValueError(f"path must end in .nii or .nii.gz, got {name!r}")
    if not description.isascii() or len(description) > 80:
        raise ValueError(f"description must be ASCII and at most 80 characters, got {len(description)} characters")
    affine = nifti_affine(arr.shape, spacing_mm)
    path = check_writable(path, overwrite=overwrite)

    stored = np.ascontiguousarray(arr.transpose(_TO_FILE), dtype=np.float32)
    img = nib.Nifti1Image(stored, affine)
    header = img.header
    header.set_data_dtype(np.float32)
    header.set_xyzt_units(xyz="mm", t="sec")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=2)
    header["intent_name"] = OCTPIPE_INTENT_NAME.encode("ascii")
    header["descrip"] = description.encode("ascii")
    header["scl_slope"] = 1.0
    header["scl_inter"] = 0.0

    suffix = ".nii.gz" if name.endswith(".nii.gz") else ".nii"
    with atomic_output(path, suffix=suffix) as tmp:  # nibabel picks the format from the suffix
        nib.save(img, tmp)
    return path


def _source_files(img: nib.Nifti1Pair | nib.Nifti2Pair, path: Path) -> list[Path]:
    """Return the file(s) holding an image: one for .nii, header + image for a .hdr/.img pair."""
    files = []
    for key in ("header", "image"):
        holder = img.file_map.get(key)
        name = getattr(holder, "filename", None)
        if name is not None and Path(name) not in files:
            files.append(Path(name))
    return files or [path]


def _one_line(exc: BaseException) -> str:
    """An exception's message as one line (nibabel's span several)."""
    return " ".join(str(exc).split())[:300]


def _starts_like_nifti(path: Path) -> bool:
    """Tell whether a file begins with a NIfTI-1/2 ``sizeof_hdr`` (348 or 540), gzipped or not."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(4)
            if head[:2] == b"\x1f\x8b":
                fh.seek(0)
                with gzip.GzipFile(fileobj=fh) as gz:
                    head = gz.read(4)
    except (OSError, EOFError, zlib.error):
        return False
    if len(head) < 4:
        return False
    return any(int.from_bytes(head, order) in (348, 540) for order in ("little", "big"))


def _column_norms(header: nib.Nifti1Header, header_file: Path) -> list[float]:
    """Voxel sizes (i, j, k) in mm: column norms of the sform, else the qform, else the raw pixdim.

    nibabel replaces a zero pixdim by 1 in its fallback affine; the raw pixdim is used
    instead so that a missing voxel size stays 0 (and the caller falls back to defaults).
    The header stores float32: the shortest decimal that rounds to each value is
    returned (0.12, not 0.1199999973).
    """
    if int(header["sform_code"]) > 0:
        columns = np.linalg.norm(np.asarray(header.get_sform(), dtype=np.float64)[:3, :3], axis=0)
    elif int(header["qform_code"]) > 0:
        columns = np.linalg.norm(np.asarray(header.get_qform(), dtype=np.float64)[:3, :3], axis=0)
    else:
        try:  # the header as stored, before nibabel's load-time fixes
            with ImageOpener(header_file) as fh:
                pixdim = type(header).from_fileobj(fh, check=False)["pixdim"]
        except (OSError, EOFError, ValueError, HeaderDataError, zlib.error):
            pixdim = header["pixdim"]
        columns = np.abs(np.asarray(pixdim, dtype=np.float64)[1:4])
    return [float(str(np.float32(n))) if np.isfinite(n) else float("nan") for n in columns]


def _header_text(field: npt.NDArray[np.bytes_]) -> str:
    """Decode a fixed-length header string field (up to the first NUL)."""
    return bytes(np.asarray(field).item()).split(b"\x00")[0].decode("ascii", "replace").strip()


def read_nifti(path: str | Path) -> OctVolume:
    """Read a NIfTI-1/2 image as an :class:`OctVolume`.

    Parameters
    ----------
    path : str or Path
        A ``.nii``, ``.nii.gz`` or ``.hdr``/``.img`` file.

    Returns
    -------
    OctVolume
        ``data`` float32 ``(n_bscans, n_axial, n_ascans)`` following the axis
        convention in the module docstring; ``spacing_source="file"`` (affine
        column norms), ``laterality=None``, ``intensity="display"``,
        ``scan_pattern`` ``"volume"`` or ``"line"``. ``meta`` holds
        ``octpipe_layout`` (True for files written by :func:`write_nifti`), the
        stored ``dtype`` and ``description`` (the header's ``descrip``). NaN/Inf
        voxels are 0 in ``data`` and True in ``invalid`` (None when there are none).

    Raises
    ------
    FileNotFoundError
        ``path`` does not exist.
    FormatError
        The file is not NIfTI.
    CorruptFileError
        The file is truncated or its header does not fit its data.
    UnsupportedFormatError
        The image is 4-D or more, or its data type is complex/RGB.

    Examples
    --------
    >>> import tempfile
    >>> p = write_nifti(tempfile.mkdtemp() + "/v.nii", np.ones((2, 8, 4)), spacing_mm=(0.1, 0.004, 0.01))
    >>> v = read_nifti(p)
    >>> v.shape, v.spacing_mm
    ((2, 8, 4), (0.1, 0.004, 0.01))
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such file: {path}")
    if path.is_dir():
        raise FormatError("is a folder, not a NIfTI file", path)
    try:
        img = nib.load(path)
    except ImageFileError as exc:
        if _starts_like_nifti(path):
            raise CorruptFileError("NIfTI header is truncated or damaged", path) from exc
        raise FormatError(f"not a NIfTI file ({_one_line(exc)})", path) from exc
    except (EOFError, OSError, ValueError, zlib.error, gzip.BadGzipFile, HeaderDataError, OverflowError) as exc:
        raise CorruptFileError(f"cannot read the NIfTI header: {_one_line(exc)}", path) from exc
    try:
        return _volume_from_image(img, path)
    except (HeaderDataError, OverflowError, ValueError, TypeError, zlib.error, EOFError) as exc:
        raise CorruptFileError(f"damaged NIfTI header: {type(exc).__name__}: {_one_line(exc)}", path) from exc


def _volume_from_image(img: nib.Nifti1Pair | nib.Nifti2Pair, path: Path) -> OctVolume:
    """The body of :func:`read_nifti` once nibabel has parsed the header."""
    if not isinstance(img, (nib.Nifti1Pair, nib.Nifti2Pair)):  # the Image classes are subclasses
        raise FormatError(f"not a NIfTI file (nibabel read it as {type(img).__name__})", path)

    header = img.header
    shape = tuple(int(n) for n in img.shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) > 3:
        raise UnsupportedFormatError(f"{len(shape)}-D image {shape}; only 2-D and 3-D images are supported", path)
    if len(shape) < 2 or min(shape) < 1:
        raise CorruptFileError(f"image shape {shape} is not a 2-D or 3-D image", path)
    dtype = header.get_data_dtype()
    if dtype.kind not in "uifb" or dtype.names is not None:
        raise UnsupportedFormatError(f"data type {dtype} is not supported (need real-valued voxels)", path)
    n_voxels = int(np.prod(shape, dtype=np.int64))
    if n_voxels * 4 > _MAX_VOLUME_BYTES:
        raise CorruptFileError(f"header says shape {shape}, over {_MAX_VOLUME_BYTES >> 30} GiB", path)
    files = _source_files(img, path)
    image_file = files[-1]
    if not image_file.exists():
        raise CorruptFileError(f"image file {image_file.name} of the header/image pair is missing", path)
    offset = float(header.get_data_offset())
    if not (np.isfinite(offset) and 0 <= offset < _MAX_VOLUME_BYTES):
        raise CorruptFileError(f"implausible vox_offset {offset}", path)
    needed = int(offset) + n_voxels * dtype.itemsize
    have = image_file.stat().st_size
    if str(image_file).endswith(".gz"):
        # the decoded size is unknown before decompressing, but deflate expands at most 1032-fold:
        # refuse a shape that this file cannot hold before anything of that size is allocated
        if needed > have * DEFLATE_MAX_RATIO:
            raise CorruptFileError(f"header says {needed} bytes (shape {shape}, {dtype}), more than "
                                   f"{have} gzip bytes can hold", path)
    elif have < needed:
        raise CorruptFileError(f"header says {needed} bytes (shape {shape}, {dtype}) but the file has {have}",
                               path)
    try:
        with np.errstate(all="ignore"):  # a damaged scl_slope gives inf/NaN, marked invalid below
            values = np.asarray(img.dataobj, dtype=np.float32).reshape(shape)
    except (EOFError, OSError, ValueError, zlib.error, gzip.BadGzipFile) as exc:
        raise CorruptFileError(f"cannot read the image data (truncated?): {_one_line(exc)}", path) from exc

    intent = _header_text(header["intent_name"])
    ours = intent == OCTPIPE_INTENT_NAME and len(shape) == 3
    norms = _column_norms(header, files[0])
    if len(shape) == 3:
        data = values.transpose(_FROM_FILE)
        candidate = (float(norms[1]), float(norms[2]), float(norms[0]))
        spacing_ok = all(np.isfinite(s) and s > 0 for s in candidate)
    else:
        data = values.T[None]
        candidate = (0.0, float(norms[1]), float(norms[0]))
        spacing_ok = all(np.isfinite(s) and s > 0 for s in candidate[1:])
    spacing, source = (candidate, "file") if spacing_ok else (DEFAULT_SPACING_MM, "default")
    descrip = _header_text(header["descrip"])

    prov, vid = make_provenance(path, reader="nifti", format="nifti", sha256=file_sha256(files))
    data = np.ascontiguousarray(data, dtype=np.float32)
    invalid = ~np.isfinite(data)  # NaN/Inf voxels (or a damaged scl_slope): "no data", as in .vol files
    if invalid.any():
        data = data.copy() if not data.flags.writeable else data
        data[invalid] = 0.0
    return OctVolume(
        data=data,
        invalid=invalid if invalid.any() else None,
        spacing_mm=spacing,
        spacing_source=source,
        laterality=None,
        scan_pattern="volume" if data.shape[0] > 1 else "line",
        vendor="unknown",
        intensity="display",
        volume_id=vid,
        provenance=prov,
        meta={"octpipe_layout": ours, "dtype": str(dtype), "description": descrip},
    )
